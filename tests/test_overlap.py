"""overlap.py on made-up texts: exact and near-exact repeats of training paragraphs are removed, a shared
formulaic opening is not, the layout is kept, the training text is streamed in chunks with the same
result, and an output that is an input is refused."""
import os
import subprocess
import sys

import pytest

import overlap

REPO = os.path.dirname(os.path.abspath(overlap.__file__))

OPENING = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park"
STORY = ("Tom had a red kite with a long blue tail. Every windy morning he ran up the green hill behind the "
         "old mill, let the string out slowly and watched the kite climb over the roofs of the sleepy town. "
         "Then he sat in the grass, ate an apple and told the kite about his day.")
DRIFT = ("Tom had a red kite with a long blue tail. Every windy morning he ran up the green hill behind the "
         "old mill, let the string out slowly and watched the kite climb over the roofs, but on Sunday the wind "
         "stopped, the kite fell into the pond and a duck sat on it all day long, quacking at the frogs.")
OTHER = ("The baker's cat slept in a basket of warm bread rolls until the baker sneezed so loudly that flour "
         "covered the whole kitchen and the cat ran away to hide under the stairs with a crumb.")


LONG = ("On the first day of spring the children of the valley school planted beans in paper cups, wrote their "
        "names on the cups with green crayons, set them on the sunny window sill and watered them every morning "
        "before lessons; by the end of the month the tallest plant belonged to quiet Mia, who had sung to hers, "
        "and the whole class agreed that singing must be the secret of every good garden in the world.")


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture
def train(tmp_path):
    first = write(tmp_path / "a.txt", f"{STORY}\n{OPENING}, where she met a tall giraffe who could sing.\n"
                                      "<|endoftext|>\n")
    second = write(tmp_path / "b.txt", f"Some other story.\n<|endoftext|>\n{OTHER}\n{LONG}\n<|endoftext|>\n")
    return [first, second]


def test_repeats_go_and_new_paragraphs_stay(train):
    near = OTHER.upper().replace("'", "\u2019").replace(",", " ,").replace("whole", "entire")  # one word changed
    paragraphs = [STORY,                          # exact
                  near,                           # near-exact: case, quotes, spacing and one word
                  DRIFT,                          # the first 150 characters the same, then another story
                  OPENING + ", and one day she found a shiny key under a rock near the fence.",  # the formula only
                  LONG.replace("first day", "second day"),  # its opening changed: most 8-grams the same
                  "The end.",                     # short: kept
                  "A new paragraph about a fox who counted the stars every night and never got to one hundred."]
    assert overlap.overlapping(paragraphs, train) == [True, True, True, False, True, False, False]
    # issue 29's first rule (80 characters) takes the formula too
    assert overlap.overlapping(paragraphs, train, prefix_chars=80, share=0.5)[3]


def test_the_layout_is_kept_and_the_counts_are_said(train):
    text = (f"{STORY}\n\nFirst new paragraph of the first story, with nothing from the training text in it.\n\n"
            f"{OTHER}\n\nA closing new line for a story that the training text never had in any form.\n")
    out, removed, total = overlap.remove_overlap(text, train)
    assert (removed, total) == (2, 4)
    assert out == ("First new paragraph of the first story, with nothing from the training text in it.\n\n"
                   "A closing new line for a story that the training text never had in any form.\n")
    eot = f"{STORY}\n<|endoftext|>\nA story of its own, about a snail who raced a leaf down a gutter.\n<|endoftext|>\n"
    out, removed, total = overlap.remove_overlap(eot, train)  # a story left empty takes its separator along
    assert (removed, total) == (1, 2)
    assert out == "A story of its own, about a snail who raced a leaf down a gutter.\n<|endoftext|>\n"


def test_the_training_text_is_streamed_with_the_same_result(train, monkeypatch, tmp_path):
    big = write(tmp_path / "big.txt", ("filler words that never repeat anything " * 40 + "\n") * 50 + STORY + "\n")
    paragraphs = [STORY, DRIFT, OTHER, OPENING + " until the sun went down."]
    whole = overlap.overlapping(paragraphs, [big, *train])
    chunks = []
    real = overlap.training_words

    def counted(paths):
        for chunk in real(paths):
            chunks.append(len(chunk))
            yield chunk
    monkeypatch.setattr(overlap, "CHUNK_CHARS", 50)  # runs of words cross the chunks
    monkeypatch.setattr(overlap, "training_words", counted)
    assert overlap.overlapping(paragraphs, [big, *train]) == whole == [True, True, True, False]
    assert len(chunks) > 1000 and max(chunks) <= 20  # never the whole text, nor a whole line, at once
    one_line = write(tmp_path / "one_line.txt", " ".join([STORY] * 30))  # no line breaks at all
    assert overlap.overlapping([STORY], [one_line]) == [True]
    assert list(overlap.training_words([one_line]))[0] == overlap.words(STORY[:50].rsplit(" ", 1)[0])


def test_held_out_makes_its_copy_once_and_says_what_it_removed(train, tmp_path):
    valid = write(tmp_path / "valid.txt", f"{STORY}\n\nA brand new paragraph about a frog who wanted to fly.\n")
    said = []
    path, counts = overlap.held_out(valid, train, str(tmp_path / "held"), said.append)
    assert counts == {"removed": 1, "paragraphs": 2}
    assert said == [f"removed 1 of 2 paragraphs that overlap the training text -> {path}"]
    with open(path, encoding="utf-8") as f:
        assert f.read() == "A brand new paragraph about a frog who wanted to fly.\n"
    os.utime(path, (0, 0))
    assert overlap.held_out(valid, train, str(tmp_path / "held"), said.append)[0] == path
    assert os.stat(path).st_mtime == 0  # cached: not written again


def test_the_command_refuses_an_output_that_is_an_input(train, tmp_path):
    valid = write(tmp_path / "valid.txt", f"{STORY}\n")
    before = open(valid, "rb").read()
    for out in (valid, train[0]):
        proc = subprocess.run([sys.executable, "overlap.py", "--valid", valid, "--train", *train, "--out", out],
                              cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 1 and proc.stderr.startswith(f"error: {out} is the")  # atomic.refuse_inputs
        assert "would replace the input" in proc.stderr and "Traceback" not in proc.stderr
    assert open(valid, "rb").read() == before
    out = str(tmp_path / "clean.txt")
    proc = subprocess.run([sys.executable, "overlap.py", "--valid", valid, "--train", *train, "--out", out],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and "removed 1 of 1 paragraphs" in proc.stdout and open(out).read() == ""
