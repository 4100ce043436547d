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


def test_no_end_of_text_token_comes_before_the_last_real_token_of_a_printable_prompt():
    """An unknown piece used to become the end-of-text id in mid-prompt ("of" -> "o" + end-of-text), which made
    the model drop the rest of the prompt. Words of printable characters now never do."""
    import random
    import string

    tok = load_tokenizer()
    rng = random.Random(0)
    prompts = ["a picture of stripes", "an image showing a circle", "2 circles, #1!", "qzx vjf ÷ a circle"]
    prompts += [" ".join("".join(rng.choice(string.printable[:94]) for _ in range(rng.randint(1, 7)))
                         for _ in range(rng.randint(1, 4))) for _ in range(300)]
    for prompt in prompts:
        ids = tok(prompt, truncation=True, max_length=MAX_TOKENS).input_ids
        assert tok.eos_token_id not in ids[1:-1], (prompt, tok.convert_ids_to_tokens(ids))
    assert tok.unk_token not in (tok.eos_token, tok.pad_token, tok.bos_token)
    assert tok.convert_tokens_to_ids(tok.unk_token) in tok("a ⍼ circle").input_ids  # a piece with no token


def test_everyday_words_are_whole_tokens_after_every_token_of_the_trained_model():
    """The added words come after the vocabulary the toy model was trained with, so no caption's ids move."""
    from erasure_core.toy.words import ORIGINAL_VOCAB_SIZE, WORDS

    tok = load_tokenizer()
    for word in WORDS:
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] >= ORIGINAL_VOCAB_SIZE, word
    assert max(i for text in w.all_caption_words() for i in tok(text).input_ids) < ORIGINAL_VOCAB_SIZE
