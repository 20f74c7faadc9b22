"""Sequence-task building blocks: metrics, CTC tokenizer and decoding, and the demo data they train on."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import soundfile
import torch
from transformers import Wav2Vec2CTCTokenizer

from ptm_ray.datasets import bundled_path
from ptm_ray.datasets.spoken_sentences import SAMPLING_RATE, make_spoken_sentences
from ptm_ray.datasets.support_text2text import REPLIES, make_support_replies
from ptm_ray.seq_metrics import (CTC_BLANK, ErrorRate, chrf, chrf_from_stats, chrf_stats, ctc_tokenizer, ctc_vocab,
                                 edit_distance, exact_match, greedy_ctc_decode)

from conftest import ESPEAK_MISSING

TRAIN_TRANSCRIPTS = ["open the red door", "stop the blue fan", "Close the  GREEN lamp"]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- edit distance, WER, CER -------------------------------------------------------------------------


def test_edit_distance_known_values():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "") == 3 and edit_distance("", "") == 0
    assert edit_distance("the cat sat".split(), "the cat sit".split()) == 1
    assert edit_distance([1, 2, 3], [3, 2, 1]) == 2


def test_wer_cer_known_values_and_normalisation():
    rates = ErrorRate()
    rates.update(["the cat sat"], ["the cat sit"])
    assert rates.wer == pytest.approx(1 / 3) and rates.cer == pytest.approx(1 / 11)
    rates = ErrorRate()
    rates.update(["  The CAT\tsat "], ["the cat sat"])  # case and whitespace are not errors
    assert rates.wer == 0 and rates.cer == 0
    rates.update(["a b"], ["a b c d"])  # insertions count: corpus WER = 2 / (3 + 2)
    assert rates.wer == pytest.approx(2 / 5)
    assert ErrorRate().wer == 0.0
    rates = ErrorRate()  # an empty reference: every hypothesis word and character is an insertion
    rates.update(["", "a b"], ["x y", "a c"])
    assert rates.totals() == [3, 2, 4, 3]  # words: x, y, b->c over 2; chars: "x y" (3) and b->c over "a b" (3)
    # totals add up over updates; a character deleted and two inserted count as 3 edits over 6 reference characters
    rates = ErrorRate()
    rates.update(["abcd"], ["abd"])
    rates.update(["ab", ""], ["abxy", "q"])
    assert rates.totals() == [3, 2, 4, 6]


def test_error_totals_add_up_like_all_reduce():
    refs = ["open the red door", "stop the blue fan", "close the green lamp", "move the black box"]
    hyps = ["open the red dor", "stop blue fan", "close the green lamp now", "moo the back box"]
    whole, first, second = ErrorRate(), ErrorRate(), ErrorRate()
    whole.update(refs, hyps)
    first.update(refs[:2], hyps[:2])
    second.update(refs[2:], hyps[2:])
    summed = torch.tensor(first.totals()) + torch.tensor(second.totals())  # what all_reduce(SUM) computes
    merged = ErrorRate.from_totals(summed.tolist())
    assert merged.totals() == whole.totals()
    assert merged.wer == pytest.approx(whole.wer) and merged.cer == pytest.approx(whole.cer)
    assert whole.wer == pytest.approx((1 + 1 + 1 + 2) / 16)  # dor; the missing; now added; moo, back
    with pytest.raises(ValueError, match="4 numbers"):
        ErrorRate.from_totals([1.0, 2.0])
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        whole.update(refs[:2], hyps[:1])


# --- chrF and exact match ------------------------------------------------------------------------------


def test_chrf_bounds_and_hand_computed_values():
    assert chrf(["open the red door"], ["open the red door"]) == pytest.approx(100.0)
    assert chrf(["abc"], ["xyz"]) == 0.0
    # ref "ab", hyp "ac": unigrams P = R = 1/2, bigrams P = R = 0, no 3..6-grams -> averages 1/4 each,
    # F2 = 5 * 1/4 * 1/4 / (4 * 1/4 + 1/4) = 1/4.
    assert chrf(["ab"], ["ac"]) == pytest.approx(25.0)
    # ref "abc", hyp "a b" (spaces are dropped): unigrams P 1, R 2/3; bigrams P 1, R 1/2 -> P 1, R 7/12,
    # F2 = 5 * 7/12 / (4 + 7/12) = 7/11.
    assert chrf(["abc"], ["a b"]) == pytest.approx(700 / 11)


def test_chrf_matches_sacrebleu_published_values_and_adds_up():
    # Scores printed by sacrebleu's chrF (char_order 6, word_order 0, beta 2) in the Hugging Face chrF metric card.
    assert chrf(["The ties between Obama and Netanyahu are not particularly friendly."],
                ["The relationship between Obama and Netanyahu is not exactly friendly."]) == pytest.approx(
        61.576379378113785)
    refs = ["The relationship between dogs and cats is not exactly friendly.",
            "A good bookshop is just a genteel Black Hole that knows how to read."]
    hyps = ["The relationship between cats and dogs is not exactly friendly.",
            "a good bookshop is just a genteel black hole that knows how to read."]
    assert chrf(refs, hyps) == pytest.approx(84.64214891738334)
    summed = (torch.tensor(chrf_stats(refs[0], hyps[0])) + torch.tensor(chrf_stats(refs[1], hyps[1]))).tolist()
    assert chrf_from_stats(summed) == pytest.approx(chrf(refs, hyps))
    with pytest.raises(ValueError, match="18 numbers"):
        chrf_from_stats([0.0] * 3)


def test_exact_match_normalises():
    assert exact_match("Refund: I have started a refund.", "  refund:  i have STARTED a refund. ")
    assert not exact_match("refund: yes", "refund: no")


# --- CTC vocabulary, tokenizer and greedy decoding -----------------------------------------------------


def _frames(ids: list[int], vocab_size: int, pad_to: int = 0) -> tuple[torch.Tensor, int]:
    """A CTC path for ``ids``: each label held two frames, blanks between and around (and between repeats)."""
    path = [CTC_BLANK]
    for i, token in enumerate(ids):
        if i and token == ids[i - 1]:
            path.append(CTC_BLANK)
        path += [token, token] + ([CTC_BLANK] if i % 2 else [])
    path += [3] * max(pad_to - len(path), 0)  # padding frames hold a non-blank label, to be ignored
    return torch.nn.functional.one_hot(torch.tensor(path), vocab_size).float().log_softmax(-1), len(path)


def test_ctc_vocab_layout():
    vocab = ctc_vocab(TRAIN_TRANSCRIPTS)
    assert list(vocab)[:3] == ["<pad>", "<unk>", "|"] and vocab["<pad>"] == CTC_BLANK == 0
    chars = list(vocab)[3:]
    assert chars == sorted(set("".join(t.lower() for t in TRAIN_TRANSCRIPTS)) - {" "})
    assert list(vocab.values()) == list(range(len(vocab)))


def test_ctc_tokenizer_round_trip_greedy_decode_and_unknown(tmp_path):
    tokenizer = ctc_tokenizer(TRAIN_TRANSCRIPTS, tmp_path / "tok")
    vocab = ctc_vocab(TRAIN_TRANSCRIPTS)
    assert (tmp_path / "tok" / "vocab.json").is_file() and isinstance(tokenizer, Wav2Vec2CTCTokenizer)
    texts = ["open the red door", "stop the green fan"]  # "oo" must survive the grouping of repeats
    labels = [tokenizer(t).input_ids for t in texts]
    assert labels[0] == [vocab["|" if c == " " else c] for c in texts[0]]
    assert tokenizer.decode(labels[0], group_tokens=False) == texts[0]  # labels decode without CTC grouping

    (first, n1), (second, n2) = _frames(labels[0], len(tokenizer)), _frames(labels[1], len(tokenizer))
    width = max(n1, n2) + 5
    batch = torch.stack([torch.cat([f, _frames([3], len(tokenizer), pad_to=width - n)[0]])
                         for f, n in ((first, n1), (second, n2))])
    lengths = torch.tensor([n1, n2])
    assert tokenizer.batch_decode([row[:n] for row, n in zip(batch.argmax(-1).tolist(), lengths)]) == texts
    decoded = greedy_ctc_decode(batch, lengths)
    assert decoded == labels  # same grouping as the tokenizer: repeats collapse, blanks go, padding ignored
    assert [tokenizer.decode(ids, group_tokens=False) for ids in decoded] == texts
    assert greedy_ctc_decode(batch)[0][-1] == 3  # without lengths the padding frames are decoded too

    unk = tokenizer("open the xed door!").input_ids  # 'x' and '!' never occur in the training transcripts
    assert unk.count(vocab["<unk>"]) == 2 and unk[:9] == labels[0][:9]
    reloaded = Wav2Vec2CTCTokenizer.from_pretrained(tmp_path / "tok")
    assert reloaded(texts[1]).input_ids == labels[1]
    with pytest.raises(ValueError, match="lengths has 1 entries for a batch of 2"):
        greedy_ctc_decode(batch, torch.tensor([3]))


# --- demo data ------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason=ESPEAK_MISSING)
def test_spoken_sentences_manifests_audio_and_split(tmp_path):
    manifests = make_spoken_sentences(tmp_path / "a", num_train=24, num_val=8, seed=3)
    train, val = _rows(manifests["train"]), _rows(manifests["validation"])
    assert len(train) == 24 and len(val) == 8 and list(train[0]) == ["path", "transcript"]
    for row in train + val:
        info = soundfile.info(manifests["train"].parent / row["path"])
        assert info.samplerate == SAMPLING_RATE and info.channels == 1 and 0.5 < info.duration <= 2.5
    train_texts, val_texts = {r["transcript"] for r in train}, {r["transcript"] for r in val}
    assert len(val_texts) == 8 and not val_texts & train_texts  # unseen combinations...
    assert {w for t in val_texts for w in t.split()} <= {w for t in train_texts for w in t.split()}  # ...of seen words

    again = make_spoken_sentences(tmp_path / "b", num_train=24, num_val=8, seed=3)
    assert _rows(again["train"]) == train and _rows(again["validation"]) == val
    assert (tmp_path / "b" / val[0]["path"]).read_bytes() == (tmp_path / "a" / val[0]["path"]).read_bytes()
    assert _rows(make_spoken_sentences(tmp_path / "c", 24, 8, seed=4)["train"]) != train
    stamp = manifests["train"].stat().st_mtime_ns
    make_spoken_sentences(tmp_path / "a", num_train=24, num_val=8, seed=3)  # manifests exist: nothing redone
    assert manifests["train"].stat().st_mtime_ns == stamp


def test_support_replies_rows_and_bundled_copy_is_current(tmp_path):
    paths = make_support_replies(tmp_path)
    for split in ("train", "val"):
        intents = _rows(bundled_path(f"support_intents_{split}.csv"))
        pairs, lm = _rows(paths[f"text2text_{split}"]), _rows(paths[f"lm_{split}"])
        assert len(pairs) == len(lm) == len(intents)
        for intent, pair, line in zip(intents, pairs, lm):
            assert pair["input"] == "reply: " + intent["text"]
            assert pair["target"] == f"{intent['label']}: {REPLIES[intent['label']]}"
            assert line["text"] == f"customer: {intent['text']} agent: {pair['target']}"
        assert len({p["target"] for p in pairs}) == len(REPLIES) == 8
        for key in (f"text2text_{split}", f"lm_{split}"):  # deterministic, and the committed copies are current
            assert paths[key].read_bytes() == bundled_path(paths[key].name).read_bytes()

    bad = tmp_path / "bad"
    bad.mkdir()
    for split in ("train", "val"):
        (bad / f"support_intents_{split}.csv").write_text("text,label\nhello,refund\nhi,greeting\n")
    with pytest.raises(ValueError, match=r"support_intents_train.csv row 3: label 'greeting' has no reply"):
        make_support_replies(bad / "out", intents_dir=bad)


# --- edges the corpus tests above do not reach ---------------------------------------------------------------


def test_chrf_skips_orders_the_reference_is_too_short_for():
    # ref "a" has unigrams only; hyp "ab" adds a bigram that has no reference bigram to be compared with, so only
    # order 1 counts: P = 1/2, R = 1, F2 = 5 * 1/2 / (4 * 1/2 + 1) = 5/6
    assert chrf(["a"], ["ab"]) == pytest.approx(250 / 3)
    assert chrf(["ab"], ["a"]) == pytest.approx(100 * 5 * 0.5 / (4 + 0.5))  # P = 1, R = 1/2
    assert chrf([""], [""]) == 0.0 and chrf([], []) == 0.0


def test_metrics_refuse_a_single_string_and_unpaired_lists_naming_the_function():
    for call, where in [(lambda r, h: ErrorRate().update(r, h), "ErrorRate.update"), (chrf, "chrf")]:
        for refs, hyps in [("open the door", ["open the door"]), (["open the door"], "open the door")]:
            with pytest.raises(TypeError, match=rf"^{where} takes lists of strings \(one per example\), not a single "
                                                r"string$"):
                call(refs, hyps)
        with pytest.raises(ValueError, match=rf"^{where}: 2 references but 1 hypotheses; they pair up one to one$"):
            call(["a", "b"], ["a"])


def test_greedy_ctc_decode_collapses_runs_of_any_length_and_keeps_a_first_frame():
    blank, a, b = CTC_BLANK, 3, 4
    rows = [[a, blank, b, blank, a, a, blank, a],  # starts (and ends) on a: the first frame has no predecessor
            [a, a, a, b, blank, blank, b, a]]  # a held 3 frames, b twice around two blanks
    log_probs = torch.nn.functional.one_hot(torch.tensor(rows), 6).float()
    assert greedy_ctc_decode(log_probs, torch.tensor([8, 8])) == [[a, b, a, a], [a, b, b, a]]
    assert greedy_ctc_decode(log_probs, torch.tensor([5, 8])) == [[a, b, a], [a, b, b, a]]  # frames past 5 ignored
    assert greedy_ctc_decode(log_probs, torch.tensor([8, 8]), blank=a) == [[0, 4, 0, 0], [4, 0, 4]]  # another blank
    with pytest.raises(ValueError, match=r"^greedy_ctc_decode takes log_probs of shape \(batch, frames, vocab\), got "
                                         r"\(8, 6\)$"):
        greedy_ctc_decode(log_probs[0])


def test_ctc_tokenizer_folders(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where mkdtemp puts the default folder
    (tmp_path / "tmp").mkdir()
    tokenizer = ctc_tokenizer(["café au lait"])  # no folder given: a new temporary one
    (written,) = (tmp_path / "tmp").glob("ctc_vocab_*/vocab.json")
    assert '"é"' in written.read_text(encoding="utf-8")  # readable beside a checkpoint, not \u00e9
    assert tokenizer("café").input_ids == [ctc_vocab(["café au lait"])[c] for c in "café"]
    nested = tmp_path / "run" / "checkpoint" / "tokenizer"  # parents are made
    ctc_tokenizer(TRAIN_TRANSCRIPTS, nested)
    again = ctc_tokenizer(TRAIN_TRANSCRIPTS, nested)  # and an existing folder is reused
    assert json.loads((nested / "vocab.json").read_text()) == ctc_vocab(TRAIN_TRANSCRIPTS)
    assert again("stop").input_ids == [ctc_vocab(TRAIN_TRANSCRIPTS)[c] for c in "stop"]
