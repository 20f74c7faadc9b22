"""Speech recognition with CTC: wav2vec 2.0 / HuBERT (``*ForCTC``) and DeepSpeech over log-mel features.

Data: a manifest (CSV/JSONL/Parquet) of ``data.path_column`` (audio file, relative to the manifest) and
``data.target_column`` (its transcript). The character vocabulary comes from the training transcripts
(``ptm_ray.seq_metrics.ctc_vocab``: ``<pad>`` = CTC blank, ``<unk>``, ``|`` for a space, then the
characters) and is the checkpoint's ``labels``, so the head is sized to it and it travels with the weights.
Every family's head emits per-frame scores; the loss is ``F.ctc_loss`` (mean over target lengths, as HF's
``ctc_loss_reduction="mean"``), decoding is greedy (best path), and validation reports WER and CER.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ptm_ray.models.base import Classifier, FrameClassifier
from ptm_ray.seq_metrics import CTC_BLANK, CTC_UNK, CTC_WORD_DELIMITER, ErrorRate, ctc_vocab, greedy_ctc_decode, normalize_text
from ptm_ray.tasks.base import Task, WorkerContext, all_reduce, loss_stats
from ptm_ray.tasks.registry import register_task

__all__ = ["SpeechRecognitionTask", "decode_ids", "encode_transcripts"]


def encode_transcripts(texts: list[str], labels: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated target ids and per-text lengths (the layout ``F.ctc_loss`` takes)."""
    index = {token: i for i, token in enumerate(labels)}
    unk = index[CTC_UNK]
    ids = [[index.get(CTC_WORD_DELIMITER if c == " " else c, unk) for c in normalize_text(t)] for t in texts]
    return torch.tensor([i for row in ids for i in row], dtype=torch.long), torch.tensor([len(r) for r in ids])


def decode_ids(ids: list[int], labels: list[str]) -> str:
    """Text of decoded CTC ids: ``|`` becomes a space, special tokens are dropped."""
    chars = [" " if labels[i] == CTC_WORD_DELIMITER else labels[i] for i in ids if not labels[i].startswith("<")]
    return " ".join("".join(chars).split())


@register_task
class SpeechRecognitionTask(Task):
    """CTC fine-tuning on (audio, transcript) pairs; WER and CER on validation."""

    name = "speech_recognition"
    metric, mode = "val_wer", "min"
    head = "ctc"
    requires = (Classifier, FrameClassifier)
    modalities = ("audio",)

    def inspect(self, cfg, modality):
        from ptm_ray.data import DataSummary, check_media_files, list_media_files, split_counts

        data = cfg.data
        pairs = dataclasses.replace(data, label_column=data.target_column)  # (file, transcript) rows
        for key, path in (("data.train", data.train), ("data.validation", data.validation)):
            if path is not None and "://" not in path and Path(path).expanduser().is_dir():
                raise ValueError(f"{key}={path} is a folder; model.task={self.name} needs a manifest with columns "
                                 f"{data.path_column!r} and {data.target_column!r} (data.path_column, data.target_column)")
        train, skipped_train = check_media_files(list_media_files(data.train, pairs, "data.train", "audio"), data,
                                                 "data.train", "audio")
        skipped = {"data.train": skipped_train} if skipped_train else {}
        if data.validation is None:
            num_train, _ = split_counts(len(train), data)
            train, val = train[:num_train], train[num_train:]  # the manifest's order; shuffle it beforehand
        else:
            val, skipped_val = check_media_files(list_media_files(data.validation, pairs, "data.validation", "audio"),
                                                 data, "data.validation", "audio")
            if skipped_val:
                skipped["data.validation"] = skipped_val
        vocab = ctc_vocab([text for _, text in train])
        return DataSummary(list(vocab), len(train), len(val), train, val, skipped)

    def datasets(self, summary, cfg):
        from ptm_ray.data import media_datasets

        return media_datasets(summary, cfg, "target")  # columns input (file bytes) and target (the transcript)

    @staticmethod
    def _loss_and_log_probs(ctx: WorkerContext, net: torch.nn.Module, batch: dict[str, Any],
                            train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs = {k: v.to(ctx.device) for k, v in ctx.preprocessor(list(batch["input"]), train=train).items()}
        log_probs = F.log_softmax(ctx.family.logits(net, inputs).float(), dim=-1)  # (batch, frames, vocab)
        lengths = ctx.family.frame_lengths(getattr(net, "module", net), inputs, log_probs.shape[1])
        targets, target_lengths = encode_transcripts([str(t) for t in batch["target"]], ctx.labels)
        loss = F.ctc_loss(log_probs.transpose(0, 1), targets.to(ctx.device), lengths.to(ctx.device),
                          target_lengths.to(ctx.device), blank=CTC_BLANK, reduction="mean", zero_infinity=True)
        return loss, log_probs, lengths

    def train_step(self, ctx, net, batch):
        loss, _, _ = self._loss_and_log_probs(ctx, net, batch, train=True)
        return loss, loss_stats(loss, len(batch["target"]), ctx.device)

    def evaluate(self, ctx, model, batches, autocast):
        errors = ErrorRate()
        sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)
        for batch in batches:
            with autocast():
                loss, log_probs, lengths = self._loss_and_log_probs(ctx, model, batch, train=False)
            hyps = [decode_ids(ids, ctx.labels) for ids in greedy_ctc_decode(log_probs, lengths)]
            errors.update([str(t) for t in batch["target"]], hyps)
            sums += loss_stats(loss, len(hyps), ctx.device)
        totals = all_reduce(torch.tensor(errors.totals(), dtype=torch.float64, device=ctx.device))
        all_reduce(sums)
        overall = ErrorRate.from_totals(totals.tolist())
        return {"val_loss": (sums[0] / sums[1].clamp(min=1)).item(), "val_wer": overall.wer, "val_cer": overall.cer}

    def describe(self, prediction):
        return repr(prediction["text"])

    @torch.no_grad()
    def predict(self, artifact, inputs):
        """``{"text": transcript}`` per audio clip, as the Hugging Face ASR pipeline returns."""
        batch = artifact.batch(inputs)
        log_probs = F.log_softmax(artifact.family.logits(artifact.model, batch).float(), dim=-1)
        lengths = artifact.family.frame_lengths(artifact.model, batch, log_probs.shape[1])
        return [{"text": decode_ids(ids, artifact.labels)} for ids in greedy_ctc_decode(log_probs, lengths)]
