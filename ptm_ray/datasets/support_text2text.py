"""Text-to-text and text-generation sets derived from the bundled support intents.

    python -m ptm_ray.datasets.support_text2text            # regenerate the bundled CSVs beside this file
    python -m ptm_ray.datasets.support_text2text /tmp/out   # or write them elsewhere

From each ``support_intents_{train,val}.csv`` row (text, label) it writes, in the same order:

- ``support_replies_{split}.csv`` (input, target) for T5: input ``"reply: <message>"`` (a T5-style task
  prefix), target ``"<intent>: <reply>"`` with one fixed reply per intent;
- ``support_replies_lm_{split}.csv`` (text) for GPT-2: ``"customer: <message> agent: <intent>: <reply>"``, so a
  fine-tuned causal LM learns the reply format and its validation perplexity can fall.

The output is a pure function of the intent CSVs: rerunning it rewrites identical files.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

__all__ = ["LM_AGENT", "LM_CUSTOMER", "REPLIES", "T5_PREFIX", "lm_text", "make_support_replies", "reply_target"]

T5_PREFIX = "reply: "
LM_CUSTOMER, LM_AGENT = "customer: ", " agent: "
REPLIES = {
    "refund": "sorry about that, I have started a refund to your original payment method.",
    "order_status": "your order is on its way, the tracking link is in your confirmation email.",
    "cancel_order": "I have cancelled the order, you will not be charged.",
    "change_password": "use the reset link on the sign-in page to choose a new password.",
    "billing": "I have checked your invoice and corrected the charge on your account.",
    "technical_issue": "please restart the device and update its firmware, then tell me if it still fails.",
    "product_info": "the full specifications and stock levels are on the product page.",
    "complaint": "I am sorry for your experience, I have passed this to a manager who will call you.",
}
_HERE = Path(__file__).parent
_SPLITS = ("train", "val")


def reply_target(intent: str) -> str:
    """The text-to-text target for an intent: ``"<intent>: <reply>"``.

    Raises:
        ValueError: if ``intent`` is not one of ``REPLIES``.
    """
    if intent not in REPLIES:
        raise ValueError(f"no reply for intent {intent!r}; known intents: {sorted(REPLIES)}")
    return f"{intent}: {REPLIES[intent]}"


def lm_text(message: str, intent: str) -> str:
    """One causal-LM training line: ``"customer: <message> agent: <intent>: <reply>"``."""
    return f"{LM_CUSTOMER}{message}{LM_AGENT}{reply_target(intent)}"


def _read_intents(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != ["text", "label"]:
            raise ValueError(f"{path}: expected columns ['text', 'label'], found {reader.fieldnames}")
        return [(row["text"], row["label"]) for row in reader]


def _write_csv(path: Path, header: list[str], rows: list[tuple[str, ...]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def make_support_replies(out_dir: str | Path = _HERE, intents_dir: str | Path = _HERE) -> dict[str, Path]:
    """Write the text-to-text and language-model CSVs for both splits.

    Args:
        out_dir: output folder (made if missing); by default the bundled data folder.
        intents_dir: folder holding ``support_intents_{train,val}.csv``; by default the bundled ones.

    Returns:
        Paths keyed ``text2text_train``, ``text2text_val``, ``lm_train``, ``lm_val``.

    Raises:
        ValueError: if an intent CSV has other columns or a label with no reply (naming file and row).
    """
    out, src = Path(out_dir), Path(intents_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in _SPLITS:
        source = src / f"support_intents_{split}.csv"
        rows = _read_intents(source)
        for line, (_, label) in enumerate(rows, start=2):
            if label not in REPLIES:
                raise ValueError(f"{source} row {line}: label {label!r} has no reply; known: {sorted(REPLIES)}")
        paths[f"text2text_{split}"] = out / f"support_replies_{split}.csv"
        _write_csv(paths[f"text2text_{split}"], ["input", "target"],
                   [(T5_PREFIX + text, reply_target(label)) for text, label in rows])
        paths[f"lm_{split}"] = out / f"support_replies_lm_{split}.csv"
        _write_csv(paths[f"lm_{split}"], ["text"], [(lm_text(text, label),) for text, label in rows])
    return paths


if __name__ == "__main__":
    print(make_support_replies(sys.argv[1] if len(sys.argv) > 1 else _HERE))
