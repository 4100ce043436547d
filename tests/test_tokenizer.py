from erasure_core.toy import world as w
from erasure_core.toy.model import MAX_TOKENS, load_tokenizer


def test_tokenizer_loads_offline_from_the_committed_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = load_tokenizer()
    ids = tok("a red circle with stripes").input_ids
    assert tok.convert_ids_to_tokens(ids) == [
        "<|startoftext|>", "a</w>", "red</w>", "circle</w>", "with</w>", "stripes</w>", "<|endoftext|>"]
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a red circle with stripes"


def test_every_world_word_is_one_token_and_captions_fit():
    tok = load_tokenizer()
    words = {word for text in w.all_caption_words() for word in text.replace(",", " ").replace("-", " ").split()}
    for word in words:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    longest = max(len(tok(text).input_ids) for text in w.all_caption_words())
    assert longest <= MAX_TOKENS


def test_the_slow_tokenizer_files_hold_the_same_bpe_as_tokenizer_json():
    """transformers 4.x (the WebUIs pin 4.30 and 4.46) reads vocab.json and merges.txt, 5.x reads tokenizer.json:
    both must be the same BPE, or the toy model would see other ids under a WebUI's pins."""
    import json

    from erasure_core.toy.model import ASSETS

    folder = ASSETS / "tokenizer"
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    assert json.loads((folder / "vocab.json").read_text()) == model["vocab"]
    lines = (folder / "merges.txt").read_text().splitlines()
    assert lines[0].startswith("#version") and [line.split(" ") for line in lines[1:]] == \
        [list(m) if isinstance(m, list) else m.split(" ") for m in model["merges"]]
