"""Screenshots of the Model page's Hub download box, for the README: a download in progress and a
model that does not fit.

    python packaging/screenshots_hub.py OUT_DIR [--size 1280x800]

What is real: the window, core.hub and huggingface_hub run as they do for a user, against the local
test Hub of tests/hub_server.py (no internet needed, the same one the tests use), pointed at with
HF_ENDPOINT, in a temporary HF_HOME and studio home:

* ``acme/tiny-llama``: a tiny Llama checkpoint built here (about 5 MB of weights), served at 400 kB/s
  so that the picture catches the download half way (bytes, speed, time left);
* ``acme/llama-3.1-8b-shape``: Llama-3.1-8B-Instruct's configuration (its config.json values) and
  the sizes of its four safetensors shards in the listing; Check reads the config alone, so the fit
  check is the one the real model gets on this machine with the page's default settings. Its weights
  are never fetched.

Writes OUT_DIR/model-download.png and OUT_DIR/model-no-fit.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

LLAMA_31_8B = {  # meta-llama/Llama-3.1-8B-Instruct's config.json (the values the estimate reads)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
}
SHARDS = {"model-00001-of-00004.safetensors": 4_976_698_672, "model-00002-of-00004.safetensors": 4_999_802_720,
          "model-00003-of-00004.safetensors": 4_915_916_176, "model-00004-of-00004.safetensors": 1_168_138_808}


def _serve(tmp: Path):
    from conftest import TOKENIZER_VOCAB, tiny_checkpoint, tiny_llama
    from hub_server import HubRepo, HubServer

    folder = tiny_checkpoint(tmp / "tiny")
    model = tiny_llama(0, vocab_size=TOKENIZER_VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=4)
    model.config.eos_token_id, model.config.pad_token_id = 1, 2
    model.save_pretrained(folder, safe_serialization=True)
    server = HubServer(rate=400_000).start()
    server.add(HubRepo("acme/tiny-llama", {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}))
    index = {"metadata": {}, "weight_map": {f"w{i}": name for i, name in enumerate(SHARDS)}}
    files = {"config.json": json.dumps(LLAMA_31_8B).encode(),
             "model.safetensors.index.json": json.dumps(index).encode(), **{n: b"" for n in SHARDS}}
    server.add(HubRepo("acme/llama-3.1-8b-shape", files, listed=dict(SHARDS)))
    return server


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", default="1280x800")
    args = ap.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="hub-shots-"))
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    server = _serve(tmp)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):  # after tests/conftest.py set them
        os.environ.pop(name, None)
    os.environ.update(HF_ENDPOINT=server.url, HF_HOME=str(tmp / "hf"), LORA_STUDIO_HOME=str(tmp / "home"))
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = False  # tests/conftest.py, imported above, set it for the tests
    from studio.app import MainWindow, make_app

    app = make_app()
    window = MainWindow(background=False)
    window.resize(width, height)
    window.show()
    window.show_page("model")

    def spin(until, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not until() and time.monotonic() < end:
            app.processEvents()
            time.sleep(0.02)
        for _ in range(20):
            app.processEvents()

    page = window.page("model")
    window.state.refresh_model_info()
    spin(lambda: window.state.model_info is not None or window.state.model_error, 300)
    spin(lambda: window.state.tokenizer is not None or window.state.model_error, 300)  # the default, converted once
    spin(lambda: "…" not in page.memory_labels["total"].text(), 60)
    panel = page.hub_panel
    panel.repo.setEditText("acme/tiny-llama")
    panel.check()
    spin(lambda: panel.worker is None, 60)
    panel.download()
    spin(lambda: panel.progress.value() >= 400, 60)
    window.grab().save(str(args.out / "model-download.png"))
    panel.cancel()
    spin(lambda: panel.worker is None, 10)
    panel.repo.setEditText("acme/llama-3.1-8b-shape")
    panel.status.setText("")
    panel.progress.hide()
    panel.check()
    spin(lambda: panel.worker is None, 120)
    window.grab().save(str(args.out / "model-no-fit.png"))
    window.close()
    server.stop()
    print(f"wrote {args.out / 'model-download.png'} and {args.out / 'model-no-fit.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
