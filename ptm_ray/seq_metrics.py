"""Metrics and CTC helpers for sequence tasks: speech recognition (CTC), text-to-text and text generation.

Every corpus metric here is a sum of per-example statistics, so Ray Train workers can each accumulate
their shard, ``all_reduce`` one tensor of totals, and compute the same score a single process would:

    rates = ErrorRate(); rates.update(refs, hyps)                 # word and char errors, per worker
    totals = torch.tensor(rates.totals()); dist.all_reduce(totals)
    wer = ErrorRate.from_totals(totals.tolist()).wer

    stats = torch.tensor([chrf_stats(r, h) for r, h in zip(refs, hyps)]).sum(0); dist.all_reduce(stats)
    score = chrf_from_stats(stats.tolist())

Text is compared after ``normalize_text`` (lowercase, whitespace collapsed, stripped).
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import Wav2Vec2CTCTokenizer

__all__ = ["CHRF_BETA", "CHRF_ORDER", "CTC_BLANK", "ErrorRate", "chrf", "chrf_from_stats", "chrf_stats",
           "ctc_tokenizer", "ctc_vocab", "edit_distance", "exact_match", "greedy_ctc_decode", "normalize_text"]

CHRF_ORDER = 6  # character n-grams 1..6, sacrebleu's default chrF (no word n-grams)
CHRF_BETA = 2  # recall weighs beta times as much as precision
CTC_PAD, CTC_UNK, CTC_WORD_DELIMITER = "<pad>", "<unk>", "|"
CTC_BLANK = 0  # id of <pad>, which CTC uses as its blank


def normalize_text(text: str) -> str:
    """Lowercase, collapse runs of whitespace to one space, strip: the form every metric here compares."""
    return " ".join(text.lower().split())


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1) between two sequences.

    Strings compare characters; lists compare items (e.g. words). RapidFuzz's C++ implementation, the one
    jiwer computes WER and CER with.
    """
    from rapidfuzz.distance import Levenshtein

    return int(Levenshtein.distance(ref, hyp))


def _check_pairs(refs: Sequence[str], hyps: Sequence[str], where: str) -> None:
    if isinstance(refs, str) or isinstance(hyps, str):
        raise TypeError(f"{where} takes lists of strings (one per example), not a single string")
    if len(refs) != len(hyps):
        raise ValueError(f"{where}: {len(refs)} references but {len(hyps)} hypotheses; they pair up one to one")


class ErrorRate:
    """Corpus word and character error rates, counted by jiwer: summed edits over summed reference lengths.

    ``totals()`` gives ``[word_errors, ref_words, char_errors, ref_chars]``; totals from several workers
    add up (``all_reduce``) and ``ErrorRate.from_totals`` turns the sum back into rates. Characters are
    counted on the normalised text, spaces included.
    """

    def __init__(self) -> None:
        self.word_errors = self.ref_words = self.char_errors = self.ref_chars = 0.0

    def update(self, refs: list[str], hyps: list[str]) -> None:
        """Add the edits of each (reference, hypothesis) pair, after ``normalize_text`` (jiwer counts them)."""
        import jiwer

        _check_pairs(refs, hyps, "ErrorRate.update")
        pairs = [(normalize_text(r), normalize_text(h)) for r, h in zip(refs, hyps)]
        for _, hyp in (p for p in pairs if not p[0]):  # jiwer refuses empty references: every hyp item is an insertion
            self.word_errors += len(hyp.split())
            self.char_errors += len(hyp)
        pairs = [p for p in pairs if p[0]]
        if not pairs:
            return
        refs, hyps = [r for r, _ in pairs], [h for _, h in pairs]
        words, chars = jiwer.process_words(refs, hyps), jiwer.process_characters(refs, hyps)
        self.word_errors += words.substitutions + words.deletions + words.insertions
        self.ref_words += words.substitutions + words.deletions + words.hits
        self.char_errors += chars.substitutions + chars.deletions + chars.insertions
        self.ref_chars += chars.substitutions + chars.deletions + chars.hits

    def totals(self) -> list[float]:
        """``[word_errors, ref_words, char_errors, ref_chars]``, additive across workers."""
        return [self.word_errors, self.ref_words, self.char_errors, self.ref_chars]

    @classmethod
    def from_totals(cls, totals: Sequence[float]) -> ErrorRate:
        """Rebuild from (possibly summed) ``totals()``.

        Raises:
            ValueError: if ``totals`` does not hold exactly four numbers.
        """
        if len(totals) != 4:
            raise ValueError(f"ErrorRate.from_totals takes 4 numbers [word_errors, ref_words, char_errors, "
                             f"ref_chars], got {len(totals)}")
        rates = cls()
        rates.word_errors, rates.ref_words, rates.char_errors, rates.ref_chars = (float(x) for x in totals)
        return rates

    @property
    def wer(self) -> float:
        """Word error rate (0 when no reference words were seen; can exceed 1 with many insertions)."""
        return self.word_errors / self.ref_words if self.ref_words else 0.0

    @property
    def cer(self) -> float:
        """Character error rate (0 when no reference characters were seen)."""
        return self.char_errors / self.ref_chars if self.ref_chars else 0.0


def _char_ngrams(text: str, n: int) -> Counter:
    return Counter(text[i:i + n] for i in range(len(text) - n + 1))


def chrf_stats(ref: str, hyp: str) -> list[float]:
    """Per-pair chrF statistics: for n = 1..6, [hyp n-grams, ref n-grams, matching n-grams].

    Whitespace is removed before n-grams are taken and case is kept, as sacrebleu's default chrF does.
    Sum these lists over a corpus (and over workers) and pass the sum to ``chrf_from_stats``.
    """
    ref, hyp = "".join(ref.split()), "".join(hyp.split())
    stats: list[float] = []
    for n in range(1, CHRF_ORDER + 1):
        hyp_ngrams, ref_ngrams = _char_ngrams(hyp, n), _char_ngrams(ref, n)
        stats += [sum(hyp_ngrams.values()), sum(ref_ngrams.values()), sum((hyp_ngrams & ref_ngrams).values())]
    return [float(x) for x in stats]


def chrf_from_stats(stats: Sequence[float]) -> float:
    """Corpus chrF (0..100) from summed ``chrf_stats``.

    Precision and recall are averaged over the n-gram orders that both sides have, then combined as
    F-beta with beta = 2 (sacrebleu's chrF, Popovic 2015/2016).

    Raises:
        ValueError: if ``stats`` does not hold 3 numbers per n-gram order.
    """
    if len(stats) != 3 * CHRF_ORDER:
        raise ValueError(f"chrf_from_stats takes {3 * CHRF_ORDER} numbers (3 per n-gram order 1..{CHRF_ORDER}), "
                         f"got {len(stats)}")
    precision = recall = 0.0
    orders = 0
    for n_hyp, n_ref, n_match in zip(stats[0::3], stats[1::3], stats[2::3]):
        if n_hyp > 0 and n_ref > 0:
            precision += n_match / n_hyp
            recall += n_match / n_ref
            orders += 1
    if orders == 0 or precision + recall == 0:
        return 0.0
    precision, recall = precision / orders, recall / orders
    beta2 = CHRF_BETA ** 2
    return 100.0 * (1 + beta2) * precision * recall / (beta2 * precision + recall)


def chrf(refs: list[str], hyps: list[str]) -> float:
    """Corpus chrF (0..100) of hypotheses against one reference each."""
    _check_pairs(refs, hyps, "chrf")
    summed = [0.0] * (3 * CHRF_ORDER)
    for ref, hyp in zip(refs, hyps):
        summed = [a + b for a, b in zip(summed, chrf_stats(ref, hyp))]
    return chrf_from_stats(summed)


def exact_match(ref: str, hyp: str) -> bool:
    """Whether the two texts are equal after ``normalize_text``."""
    return normalize_text(ref) == normalize_text(hyp)


def ctc_vocab(transcripts: Sequence[str]) -> dict[str, int]:
    """A ``Wav2Vec2CTCTokenizer`` vocabulary built from training transcripts, as the HF ASR tutorial does.

    ``<pad>`` = 0 (also the CTC blank), ``<unk>`` = 1, the word delimiter ``|`` (stands for a space) = 2,
    then every other character of the normalised (lowercased) transcripts, sorted. Build it from the
    training split only: characters first seen later map to ``<unk>``.
    """
    chars = sorted({c for text in transcripts for c in normalize_text(text)} - {" "})
    return {token: i for i, token in enumerate([CTC_PAD, CTC_UNK, CTC_WORD_DELIMITER] + chars)}


def ctc_tokenizer(transcripts: Sequence[str], path: str | Path | None = None) -> Wav2Vec2CTCTokenizer:
    """A character ``Wav2Vec2CTCTokenizer`` over ``ctc_vocab(transcripts)`` (training transcripts).

    The vocabulary is written to ``path/vocab.json`` (a new temporary folder when ``path`` is None) and
    loaded from there; ``tokenizer.save_pretrained`` keeps it beside a checkpoint. The vocabulary is
    lowercase, so ``do_lower_case`` stays False (in HF it upper-cases the input, for upper-case
    vocabularies): pass ``normalize_text(text)`` to the tokenizer. The tokenizer also registers ``<s>``
    and ``</s>`` after the vocabulary; size a CTC head with ``len(tokenizer)`` and set the model's
    ``pad_token_id`` to ``tokenizer.pad_token_id`` (the blank), as the tutorial does. Decode model
    output with ``batch_decode(argmax_ids)`` (groups repeats, drops blanks) but labels with
    ``decode(label_ids, group_tokens=False)``, or "door" comes back as "dor".
    """
    from transformers import Wav2Vec2CTCTokenizer

    folder = Path(path) if path is not None else Path(tempfile.mkdtemp(prefix="ctc_vocab_"))
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.json"
    vocab_file.write_text(json.dumps(ctc_vocab(transcripts), ensure_ascii=False, indent=1))
    return Wav2Vec2CTCTokenizer(str(vocab_file), unk_token=CTC_UNK, pad_token=CTC_PAD,
                                word_delimiter_token=CTC_WORD_DELIMITER, do_lower_case=False)


def greedy_ctc_decode(log_probs: torch.Tensor, lengths: torch.Tensor | None = None, blank: int = CTC_BLANK
                      ) -> list[list[int]]:
    """Best-path CTC decoding: argmax per frame, collapse repeats, then drop blanks.

    For models that do not decode through a HF tokenizer (DeepSpeech); it groups exactly as
    ``Wav2Vec2CTCTokenizer.batch_decode`` does.

    Args:
        log_probs: ``(batch, frames, vocab)`` scores (log-probabilities or logits).
        lengths: valid frames per item; frames past it are padding and ignored. None: all frames.
        blank: id of the CTC blank.

    Raises:
        ValueError: if ``log_probs`` is not 3-D or ``lengths`` does not match its batch.
    """
    if log_probs.dim() != 3:
        raise ValueError(f"greedy_ctc_decode takes log_probs of shape (batch, frames, vocab), got "
                         f"{tuple(log_probs.shape)}")
    best = log_probs.argmax(dim=-1).tolist()
    frames = [len(row) for row in best] if lengths is None else [int(n) for n in lengths]
    if len(frames) != len(best):
        raise ValueError(f"greedy_ctc_decode: lengths has {len(frames)} entries for a batch of {len(best)}")
    decoded = []
    for row, n in zip(best, frames):
        ids = [t for i, t in enumerate(row[:n]) if i == 0 or t != row[i - 1]]
        decoded.append([t for t in ids if t != blank])
    return decoded
