"""The SmolLM2 cache: runs started together convert the GGUF once and all read the result."""

import os
import threading
import time
import types

from medmoe.model import pretrained


def test_processes_started_together_convert_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMOE_CACHE", str(tmp_path))
    calls = []

    def slow_convert(target):
        calls.append(target)
        time.sleep(0.3)  # long enough for every other thread to reach the check
        os.makedirs(target, exist_ok=True)
        open(os.path.join(target, "model.safetensors"), "wb").close()

    loaded = []

    def fake_from_pretrained(path, **kwargs):
        assert os.path.isfile(os.path.join(path, "model.safetensors")), "read before the cache was complete"
        loaded.append(path)
        return types.SimpleNamespace()

    monkeypatch.setattr(pretrained, "convert_smollm2", slow_convert)
    monkeypatch.setattr(pretrained.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(pretrained.AutoTokenizer, "from_pretrained", fake_from_pretrained)
    errors = []

    def load():
        try:
            pretrained.load_smollm2()
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(calls) == 1
    assert len(loaded) == 6  # model and tokenizer, three times
