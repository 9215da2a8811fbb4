"""The demo Space: the folder scripts/make_space.py writes, the app answering through Gradio's own client in a
process that cannot import cpsl_hf, a headless Chromium using the page, and the push to the loopback Hub.

The browser test needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them and sets
``CPSL_REQUIRE_BROWSER=1``, which turns a missing browser into a failure instead of a skip). Its screenshots are
kept in ``test-artifacts/`` at the repository root.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cpsl_hf.data.protocols import CITYSCAPES_PALETTE, class_names, colorize
from cpsl_hf.space import class_palette, write_space
from cpsl_hf.utils import MissingPathError, UsageError

pytest.importorskip("gradio", reason="the demo extra (pip install 'cpsl-hf[demo]') is not installed")

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"

# Runs the Space's app.py as `python app.py` would, with cpsl_hf made unimportable first.
APP_RUNNER = textwrap.dedent(
    """
    import importlib.abc, runpy, sys

    class BlockCpslHf(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "cpsl_hf" or name.startswith("cpsl_hf."):
                raise ImportError(f"cpsl_hf is blocked in the Space ({name})")

    sys.meta_path.insert(0, BlockCpslHf())
    sys.argv = ["app.py"]
    runpy.run_path("app.py", run_name="__main__")
    """
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny trained run's exported folder (with ``examples/`` from ``--save_predictions 2``)."""
    from training.training_helpers import run, tiny_argv

    root = tmp_path_factory.mktemp("space_model")
    run(
        tiny_argv(
            root / "run",
            root / "cache",
            "--warmup_steps",
            "2",
            "--cpsl_steps",
            "0",
            "--save_predictions",
            "2",
        )
    )
    return root / "run"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served_app(model_dir, tmp_path_factory):
    """``(url, space folder)``: the written Space's app.py serving on a loopback port, cpsl_hf unimportable."""
    space = write_space(str(model_dir), "tester/tiny-demo", tmp_path_factory.mktemp("space") / "demo")
    port = _free_port()
    env = {
        **os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1", "GRADIO_TEMP_DIR": str(space.parent / "gradio_tmp"),
    }  # fmt: skip
    env.pop("PYTHONPATH", None)
    log = (space.parent / "app.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-c", APP_RUNNER], cwd=space, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError("the app exited:\n" + (space.parent / "app.log").read_text()[-3000:])
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        raise AssertionError("the app did not start:\n" + (space.parent / "app.log").read_text()[-3000:])
    yield url, space
    process.terminate()
    process.wait(timeout=20)
    log.close()


def _expected_colours(model_dir: Path, image: Image.Image) -> np.ndarray:
    """The package's own prediction (cpsl_hf.visualization, at the image's size) in the Cityscapes palette."""
    from cpsl_hf import CPSLForSemanticSegmentation
    from cpsl_hf.visualization import predict_train_ids

    model = CPSLForSemanticSegmentation.from_pretrained(model_dir).eval()
    pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
    return colorize(predict_train_ids(model, pixels).numpy(), 19)


# ------------------------------------------------------------------------------------------------ the folder


def test_written_space_folder(model_dir, tmp_path):
    space = write_space(str(model_dir), "tester/tiny-demo", tmp_path / "space")
    names = sorted(path.relative_to(space).as_posix() for path in space.rglob("*") if path.is_file())
    examples = sorted(f"examples/{path.name}" for path in (model_dir / "examples").iterdir())
    assert len(examples) == 2
    assert names == sorted(["README.md", "app.py", "requirements.txt", "space_config.json", *examples])
    for name in examples:
        assert (space / name).read_bytes() == (model_dir / name).read_bytes()
    readme = (space / "README.md").read_text()
    header = yaml.safe_load(readme.split("---\n")[1])
    import gradio
    import transformers

    assert header["sdk"] == "gradio" and header["sdk_version"] == gradio.__version__
    assert header["app_file"] == "app.py" and "models" not in header  # a local folder is no Hub model
    assert len(header["short_description"]) <= 60 and len(header["title"]) <= 60
    requirements = (space / "requirements.txt").read_text().split()
    assert f"transformers=={transformers.__version__}" in requirements and "torch" in requirements
    assert not any(line.startswith(("cpsl", "gradio")) for line in requirements)
    settings = json.loads((space / "space_config.json").read_text())
    assert settings["palette"] == CITYSCAPES_PALETTE.tolist()  # the 19 Cityscapes names keep their colours
    assert settings["model"] == str(model_dir.resolve())


def test_space_for_a_hub_model_names_it_and_bad_input_fails_clearly(model_dir, tmp_path, monkeypatch):
    import cpsl_hf.space as space_module

    config = json.loads((model_dir / "config.json").read_text())
    monkeypatch.setattr(space_module, "_model_config", lambda model: config)  # no Hub here: its config.json
    space = write_space(
        "tester/cpsl-tiny", "tester/tiny-demo", tmp_path / "space", examples=[model_dir / "examples"]
    )
    header = yaml.safe_load((space / "README.md").read_text().split("---\n")[1])
    assert header["models"] == ["tester/cpsl-tiny"]
    assert json.loads((space / "space_config.json").read_text())["model"] == "tester/cpsl-tiny"
    assert len(list((space / "examples").iterdir())) == 2
    monkeypatch.undo()

    with pytest.raises(UsageError, match="--space_id 'demo': must be USER/NAME"):
        write_space(str(model_dir), "demo", tmp_path / "x")
    with pytest.raises(UsageError, match="neither a local model folder nor a Hub repo id"):
        write_space("no such model", "tester/demo", tmp_path / "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingPathError, match="empty: has no config.json"):
        write_space(str(tmp_path / "empty"), "tester/demo", tmp_path / "x")
    with pytest.raises(MissingPathError, match="--examples .*missing.png: no such file"):
        write_space(str(model_dir), "tester/demo", tmp_path / "x", examples=[tmp_path / "missing.png"])
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(UsageError, match="notes.txt: not an image"):
        write_space(str(model_dir), "tester/demo", tmp_path / "x", examples=[tmp_path / "notes.txt"])


def test_make_space_script_and_push_refuses_a_local_model(model_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "scripts" / "make_space.py"), "--model", str(model_dir), "--space_id",
               "tester/demo", "--output_dir", str(tmp_path / "space")]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "space" / "app.py").read_text() == (
        REPO / "cpsl_hf" / "space_app" / "app.py"
    ).read_text()
    result = subprocess.run([*command, "--push"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith("push the model first (scripts/push_to_hub.py) and pass its repo id as --model")
    )


def test_class_palette_keeps_cityscapes_colours_and_separates_others():
    names = ["road", "crop", "weed", "soil", "sky"]
    colours = class_palette(names)
    cityscapes = dict(zip(class_names(19), CITYSCAPES_PALETTE.tolist()))
    assert colours[0] == cityscapes["road"] and colours[4] == cityscapes["sky"]
    others = colours[1:4]
    assert len({tuple(colour) for colour in colours}) == len(names)
    assert all(0 <= value <= 255 for colour in others for value in colour)
    assert (
        min(sum(abs(a - b) for a, b in zip(x, y)) for i, x in enumerate(others) for y in others[i + 1 :]) > 60
    )


# ------------------------------------------------------------------------------------------- the live app


def test_app_answers_a_prediction_through_the_gradio_client(served_app, model_dir):
    """The mask is the package's own prediction in the palette (lossless PNG), the overlay blends it 50/50 with
    the image, the legend lists exactly the classes present."""
    from gradio_client import Client, handle_file

    url, space = served_app
    example = sorted((space / "examples").iterdir())[0]
    client = Client(url, verbose=False)
    mask_path, overlay_path, legend = client.predict(handle_file(str(example)), api_name="/segment")
    image = Image.open(example).convert("RGB")
    mask = np.asarray(Image.open(mask_path).convert("RGB"))
    expected = _expected_colours(model_dir, image)
    np.testing.assert_array_equal(mask, expected)
    overlay = np.asarray(Image.open(overlay_path).convert("RGB")).astype(int)
    blend = (0.5 * np.asarray(image, dtype=np.float32) + 0.5 * expected).round().astype(int)
    assert np.abs(overlay - blend).max() <= 1
    present = {name for name, colour in zip(class_names(19), CITYSCAPES_PALETTE.tolist())
               if (expected == colour).all(axis=-1).any()}  # fmt: skip
    listed = {name for name in class_names(19) if f"</span>{name} (" in legend}
    assert listed == present and present


@pytest.fixture
def browser(tmp_path):
    """Headless Debian Chromium through chromedriver (selenium); skipped without it unless
    CPSL_REQUIRE_BROWSER=1 (CI)."""
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        if os.environ.get("CPSL_REQUIRE_BROWSER") == "1":
            raise AssertionError("CPSL_REQUIRE_BROWSER=1 but chromium / chromedriver are not installed")
        pytest.skip("chromium and chromium-driver (Debian packages) are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def test_a_browser_uploads_an_image_and_sees_the_mask(served_app, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    url, space = served_app
    ARTIFACTS.mkdir(exist_ok=True)
    wait = WebDriverWait(browser, 60)
    browser.get(url)
    upload = wait.until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#cpsl-input input[type=file]"))
    )
    assert browser.find_element(By.ID, "cpsl-segment").is_displayed()
    browser.save_screenshot(str(ARTIFACTS / "space_demo_loaded.png"))
    assert not browser.find_elements(By.CSS_SELECTOR, "#cpsl-mask img")  # no mask before a prediction
    upload.send_keys(str(sorted((space / "examples").iterdir())[0]))
    wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#cpsl-input img")))
    browser.find_element(By.ID, "cpsl-segment").click()
    mask = wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#cpsl-mask img")))
    wait.until(
        lambda driver: driver.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", mask
        )
    )
    assert browser.find_element(By.CSS_SELECTOR, "#cpsl-overlay img").get_attribute("src")
    wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#cpsl-legend li.cpsl-class"))
    browser.save_screenshot(str(ARTIFACTS / "space_demo_prediction.png"))
    assert Image.open(ARTIFACTS / "space_demo_prediction.png").size[0] > 0


def test_class_palette_from_the_models_class_table(tmp_path):
    table = tmp_path / "classes.yaml"
    table.write_text(
        "void_values: [0]\nclasses:\n"
        "  - {name: crop, values: [1], color: [10, 200, 30]}\n"
        "  - {name: road, values: [2], color: [250, 250, 0]}\n"
    )
    assert class_palette(["crop", "road"], table) == [
        [10, 200, 30],
        [250, 250, 0],
    ]  # the table wins by name too
    with pytest.raises(
        UsageError, match="classes.yaml: its classes \\['crop', 'road'\\] are not the model's"
    ):
        class_palette(["road", "crop"], table)


def test_push_space_through_the_real_client(tmp_path, monkeypatch, model_dir):
    """A Space written for a Hub model lands in a Gradio Space repo of the loopback Hub, every file as written."""
    import huggingface_hub
    from hub_server import LocalHub

    import cpsl_hf.space as space_module
    from cpsl_hf.space import push_space

    config = json.loads((model_dir / "config.json").read_text())
    monkeypatch.setattr(space_module, "_model_config", lambda model: config)
    space = write_space(
        "tester/cpsl-tiny", "tester/tiny-demo", tmp_path / "space", examples=[model_dir / "examples"]
    )
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with LocalHub(tmp_path / "server") as server:
        url = push_space(
            space, "tester/tiny-demo", private=True, token=server.token, endpoint=server.endpoint
        )
        with pytest.raises(Exception, match="401|Invalid credentials|rejected"):
            push_space(space, "tester/tiny-demo", token="hf_wrong", endpoint=server.endpoint)
    assert url == f"{server.endpoint}/spaces/tester/tiny-demo" and server.unexpected == []
    assert server.created[0]["type"] == "space" and server.created[0]["sdk"] == "gradio"
    assert server.created[0].get("private") is True or server.created[0].get("visibility") == "private"
    arrived = server.repo_dir("tester/tiny-demo", "space")
    written = sorted(path.relative_to(space).as_posix() for path in space.rglob("*") if path.is_file())
    assert (
        sorted(path.relative_to(arrived).as_posix() for path in arrived.rglob("*") if path.is_file())
        == written
    )
    for name in written:
        assert (arrived / name).read_bytes() == (space / name).read_bytes(), name
