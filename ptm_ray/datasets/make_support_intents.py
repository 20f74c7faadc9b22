"""Regenerate the bundled customer-support intent set (support_intents_{train,val}.csv).

Every row is written from hand-made templates per intent, filled with products, order numbers,
politeness openers and closers drawn by a seeded RNG. Templates share words across intents ("order",
"account", "payment") so the task needs more than one keyword; the validation split also uses phrasings never seen in training. Run: python -m ptm_ray.datasets.make_support_intents
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

TEMPLATES = {
    "refund": [
        "I want my money back for the {product}",
        "can I get a refund on order {order}",
        "the {product} broke after two days, please refund me",
        "how long does a refund take to reach my card",
        "you charged me but I returned the {product}, where is my refund",
        "I'd like to return the {product} and be reimbursed",
    ],
    "order_status": [
        "where is my order {order}",
        "my {product} has not arrived yet",
        "can you track package {order} for me",
        "when will the {product} be delivered",
        "the tracking page for {order} has not changed in a week",
        "is order {order} shipped already",
    ],
    "cancel_order": [
        "please cancel order {order}",
        "I ordered the {product} by mistake, cancel it",
        "stop my order before it ships",
        "I changed my mind about the {product}, can I cancel",
        "cancel everything on order {order} please",
        "how do I cancel an order I placed today",
    ],
    "change_password": [
        "I forgot my password",
        "how do I reset the password on my account",
        "the password reset email never came",
        "I want to change my login password",
        "my account is locked after too many password attempts",
        "can't sign in, need a new password",
    ],
    "billing": [
        "I was charged twice for order {order}",
        "why is there an extra fee on my invoice",
        "update the credit card on my account",
        "my payment for the {product} was declined",
        "send me an invoice for order {order}",
        "which payment methods do you accept",
    ],
    "technical_issue": [
        "the {product} won't turn on",
        "the app crashes when I open my account page",
        "my {product} keeps disconnecting from wifi",
        "the website shows an error at checkout",
        "the {product} makes a strange noise",
        "firmware update failed on my {product}",
    ],
    "product_info": [
        "does the {product} come in black",
        "what is the battery life of the {product}",
        "is the {product} compatible with my phone",
        "how big is the {product}",
        "what's the warranty on the {product}",
        "do you have the {product} in stock",
    ],
    "complaint": [
        "your support has been useless, I am very unhappy",
        "this is the worst service I have ever had",
        "I've been waiting for an answer for weeks, this is unacceptable",
        "the courier was rude and threw my {product}",
        "I want to speak to a manager about order {order}",
        "nobody answers the phone, terrible experience",
    ],
}
# Phrasings that only the validation split uses: validation measures generalisation, not recall.
HELD_OUT = {
    "refund": ["please reverse the charge and credit me for the {product}", "I need reimbursement for {order}"],
    "order_status": ["any news on the delivery of {order}", "has the {product} left the warehouse"],
    "cancel_order": ["don't send the {product}, I no longer want it", "withdraw my purchase {order}"],
    "change_password": ["I can't remember my login credentials", "help me get back into my account, lost my passcode"],
    "billing": ["there's a charge on my statement I don't recognise", "my card was billed the wrong amount"],
    "technical_issue": ["the {product} stopped working this morning", "the screen of my {product} is frozen"],
    "product_info": ["tell me the dimensions of the {product}", "which colours are available for the {product}"],
    "complaint": ["I am disappointed with how you treated me", "this company is a joke, nobody cares"],
}
PRODUCTS = ["headphones", "blender", "smart watch", "laptop stand", "coffee maker", "speaker", "kettle",
            "phone case", "desk lamp", "router", "keyboard", "vacuum"]
OPENERS = ["", "", "", "hi, ", "hello, ", "hey ", "good morning, ", "excuse me, ", "quick question: "]
CLOSERS = ["", "", "", " thanks", " thank you!", "?", " asap", " please help", "!!"]


def make_rows(n_per_intent: int, rng: random.Random, held_out: bool = False) -> list[tuple[str, str]]:
    rows = []
    for intent, templates in TEMPLATES.items():
        if held_out:
            templates = templates + HELD_OUT[intent] * 2  # about half the validation rows are unseen phrasings
        for _ in range(n_per_intent):
            text = rng.choice(templates).format(product=rng.choice(PRODUCTS), order=f"#{rng.randint(10000, 99999)}")
            rows.append((rng.choice(OPENERS) + text + rng.choice(CLOSERS), intent))
    rng.shuffle(rows)
    return rows


def main(out_dir: Path = Path(__file__).parent) -> None:
    rng = random.Random(20261130)
    for split, n in (("train", 40), ("val", 12)):
        held_out = split == "val"
        with open(out_dir / f"support_intents_{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(make_rows(n, rng, held_out))


if __name__ == "__main__":
    main()
