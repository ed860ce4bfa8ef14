import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import builders  # noqa: E402

from tl_logitlens.kernel import native, tuning  # noqa: E402

torch.set_num_threads(2)

CASES = builders.cases()

# The kernel's two statistics paths (tl_logitlens.kernel.native): the fused C kernel, built here
# at collection where a C compiler answers, and eager tensor operations. Tests of exactness take
# the `stats_path` fixture (or these params) to run on both.
FUSED_AVAILABLE = native.library() is not None
STATS_PATHS = [
    pytest.param(
        True, id="fused", marks=pytest.mark.skipif(not FUSED_AVAILABLE, reason=f"no fused kernel: {native.status()}")
    ),
    pytest.param(False, id="eager"),
]


@pytest.fixture(params=STATS_PATHS)
def stats_path(request):
    """Run the test with the kernel's statistics on one path: ``True`` fused, ``False`` eager."""
    with tuning.force(fused=request.param):
        yield request.param


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request):
    """(Case, model) for every configuration the installed transformer-lens can build."""
    return request.param, builders.build(request.param)


@pytest.fixture(scope="session")
def models_dir():
    """The folder of real trained models (TL_LOGITLENS_MODELS), or skip."""
    path = os.environ.get("TL_LOGITLENS_MODELS")
    if not path or not Path(path).is_dir():
        pytest.skip("TL_LOGITLENS_MODELS is not set to the folder of real models")
    return Path(path)


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-process gloo group for the test's duration (FileStore: no ports)."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("this torch build has no torch.distributed")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and are immune to a busy machine's scheduling."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def driver():
    """Headless Chromium (selenium) with the network off, or skip naming what is missing."""
    pytest.importorskip("plotly", reason="plotly is not installed (pip install tl-logitlens[interactive])")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (dev extras)")
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1500,1100",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    drv.execute_cdp_cmd("Network.enable", {})
    drv.execute_cdp_cmd(
        "Network.emulateNetworkConditions",
        {"offline": True, "latency": 0, "downloadThroughput": 0, "uploadThroughput": 0},
    )
    yield drv
    drv.quit()
