"""Text generation tasks on Hugging Face language models.

``text2text`` (T5, ``AutoModelForSeq2SeqLM``): rows ``input`` and ``target`` (``data.text_column``,
``data.target_column``), teacher-forced cross-entropy on the target tokens; validation generates greedily
and scores exact match and chrF against the targets.

``text_generation`` (GPT-2, ``AutoModelForCausalLM``): rows ``input`` (``data.text_column``), causal-LM
cross-entropy on every token (each text ends with the end-of-text token, so the model learns to stop);
validation reports the token-level loss and its perplexity.

Both predict with ``generate``: ``max_new_tokens``, ``num_beams``, ``do_sample``, ``temperature``,
``top_k``, ``top_p`` and ``seed`` (sampling draws from a generator seeded per call, so a served request
and an offline call with the same seed return the same text). Over HTTP each option is bounded by the
server's limits (``serve.max_new_tokens``, ``serve.max_num_beams``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from ptm_ray.models.base import Generator
from ptm_ray.tasks.base import Task, WorkerContext, all_reduce, loss_stats, parse_options
from ptm_ray.tasks.registry import register_task

if TYPE_CHECKING:
    from ptm_ray.checkpoint import Artifact

__all__ = ["GenerationOptions", "Text2TextTask", "TextGenerationTask"]


class GenerationOptions(BaseModel):
    """Options of ``generate`` a request may set (HF names and defaults; greedy unless ``do_sample``)."""

    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(default=32, ge=1)
    num_beams: int = Field(default=1, ge=1)
    do_sample: bool = False
    temperature: float = Field(default=1.0, gt=0.0, le=10.0)
    top_k: int = Field(default=50, ge=0, le=10_000)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0)


def _request_options(parameters: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    if "max_new_tokens" not in parameters:  # the default, capped by this server's limit
        parameters = parameters | {"max_new_tokens": min(GenerationOptions().max_new_tokens, settings["max_new_tokens"])}
    options = parse_options(GenerationOptions, parameters)
    if options["max_new_tokens"] > settings["max_new_tokens"]:
        raise ValueError(f"max_new_tokens={options['max_new_tokens']} exceeds the server's limit of "
                         f"{settings['max_new_tokens']} (serve.max_new_tokens)")
    if options["num_beams"] > settings["max_num_beams"]:
        raise ValueError(f"num_beams={options['num_beams']} exceeds the server's limit of {settings['max_num_beams']} "
                         "(serve.max_num_beams)")
    return options


@torch.no_grad()
def _generate(artifact: "Artifact", inputs: list[str], decoder_only: bool, **options: Any) -> list[list[int]]:
    """New token ids per input (the prompt removed for decoder-only models)."""
    options = GenerationOptions.model_validate(options).model_dump()
    seed = options.pop("seed")
    tokenizer = artifact.preprocessor.tokenizer
    if decoder_only:
        tokenizer.padding_side = "left"  # generation continues from the last real token of each row
    batch = artifact.batch(inputs)
    if not options["do_sample"]:
        options = {k: v for k, v in options.items() if k not in ("temperature", "top_k", "top_p")}
    if seed is not None:
        torch.manual_seed(seed)
    out = artifact.family.generate(artifact.model, batch, **options, pad_token_id=tokenizer.pad_token_id)
    if decoder_only:
        out = out[:, batch["input_ids"].shape[1]:]
    return [[t for t in row.tolist() if t != tokenizer.pad_token_id] for row in out]


class _LanguageModelTask(Task):
    """What both generation tasks share: text in, a token-weighted mean loss, ``generate`` options."""

    requires = (Generator,)
    modalities = ("text",)
    stat_names = ("loss_sum", "tokens")

    @staticmethod
    def _loss(ctx: WorkerContext, net: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def train_step(self, ctx, net, batch):
        loss, tokens = self._loss(ctx, net, batch)
        return loss, loss_stats(loss, tokens, ctx.device)

    def request_options(self, parameters, settings):
        return _request_options(parameters, settings)

    def describe(self, prediction):
        return repr(prediction["generated_text"])


@register_task
class Text2TextTask(_LanguageModelTask):
    """T5-style sequence-to-sequence fine-tuning with teacher forcing."""

    name = "text2text"
    metric, mode = "val_chrf", "max"
    head = "seq2seq"

    def inspect(self, cfg, modality):
        from ptm_ray.data import inspect_table

        data = cfg.data
        columns = {data.text_column: "data.text_column", data.target_column: "data.target_column"}
        return inspect_table(data, columns, (data.text_column, data.target_column))

    def datasets(self, summary, cfg):
        from ptm_ray.data import table_datasets

        data = cfg.data
        return table_datasets(data, {data.text_column: "input", data.target_column: "target"}, summary)

    @staticmethod
    def _loss(ctx: WorkerContext, net: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        tokenizer = ctx.preprocessor.tokenizer
        inputs = {k: v.to(ctx.device) for k, v in ctx.preprocessor(list(batch["input"])).items()}
        targets = tokenizer(text_target=[str(t) for t in batch["target"]], padding=True, truncation=True,
                            max_length=ctx.cfg.model.max_length, return_tensors="pt")
        labels = targets["input_ids"].masked_fill(targets["attention_mask"] == 0, -100).to(ctx.device)
        loss = net(**inputs, labels=labels).loss.float()  # mean over the target tokens
        return loss, int((labels != -100).sum())

    def evaluate(self, ctx, model, batches, autocast):
        from ptm_ray.seq_metrics import chrf_from_stats, chrf_stats, exact_match

        tokenizer = ctx.preprocessor.tokenizer
        sums: torch.Tensor | None = None
        for batch in batches:
            with autocast():
                loss, tokens = self._loss(ctx, model, batch)
                inputs = {k: v.to(ctx.device) for k, v in ctx.preprocessor(list(batch["input"])).items()}
                generated = ctx.family.generate(model, inputs, max_new_tokens=ctx.cfg.model.max_length, num_beams=1,
                                                do_sample=False)
            hyps = tokenizer.batch_decode(generated, skip_special_tokens=True)
            refs = [str(t) for t in batch["target"]]
            row = [loss.item() * tokens, tokens, len(refs), sum(exact_match(r, h) for r, h in zip(refs, hyps))]
            row += [sum(col) for col in zip(*(chrf_stats(r, h) for r, h in zip(refs, hyps)))]
            batch_sums = torch.tensor(row, dtype=torch.float64, device=ctx.device)
            sums = batch_sums if sums is None else sums + batch_sums
        if sums is None:  # this worker got no validation batch: contribute zeros of the right shape
            sums = torch.zeros(4 + len(chrf_stats("a", "a")), dtype=torch.float64, device=ctx.device)
        all_reduce(sums)
        loss_sum, tokens, rows, exact = sums[:4].tolist()
        return {"val_loss": loss_sum / max(tokens, 1), "val_exact_match": exact / max(rows, 1),
                "val_chrf": chrf_from_stats(sums[4:].tolist())}

    def predict(self, artifact, inputs, **options):
        """``{"generated_text": ...}`` per input, as the Hugging Face text2text-generation pipeline returns."""
        tokenizer = artifact.preprocessor.tokenizer
        ids = _generate(artifact, inputs, decoder_only=False, **options)
        return [{"generated_text": text} for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]


@register_task
class TextGenerationTask(_LanguageModelTask):
    """GPT-2-style causal language modelling on a text column."""

    name = "text_generation"
    metric, mode = "val_perplexity", "min"
    head = "causal_lm"

    def inspect(self, cfg, modality):
        from ptm_ray.data import inspect_table

        column = cfg.data.text_column
        return inspect_table(cfg.data, {column: "data.text_column"}, (column,))

    def datasets(self, summary, cfg):
        from ptm_ray.data import table_datasets

        return table_datasets(cfg.data, {cfg.data.text_column: "input"}, summary)

    @staticmethod
    def _loss(ctx: WorkerContext, net: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        tokenizer = ctx.preprocessor.tokenizer
        tokenizer.padding_side = "right"
        texts = [str(t) + tokenizer.eos_token for t in batch["input"]]
        inputs = {k: v.to(ctx.device) for k, v in ctx.preprocessor(texts).items()}
        # the pad token is GPT-2's end-of-text token: mask padding by the attention mask, not by its id
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        loss = net(**inputs, labels=labels).loss.float()  # mean over the predicted (shifted) tokens
        return loss, int((labels[:, 1:] != -100).sum())

    def evaluate(self, ctx, model, batches, autocast):
        sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)
        for batch in batches:
            with autocast():
                loss, tokens = self._loss(ctx, model, batch)
            sums += loss_stats(loss, tokens, ctx.device)
        all_reduce(sums)
        val_loss = (sums[0] / sums[1].clamp(min=1)).item()
        return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0))}

    def predict(self, artifact, inputs, **options):
        """``{"generated_text": prompt + continuation, "completion": continuation}`` per prompt (the HF
        text-generation pipeline's ``generated_text`` includes the prompt)."""
        tokenizer = artifact.preprocessor.tokenizer
        ids = _generate(artifact, inputs, decoder_only=True, **options)
        completions = tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [{"generated_text": prompt + completion, "completion": completion}
                for prompt, completion in zip(inputs, completions)]
