"""model.pooling=mean for text encoders: the model's own head reads the masked mean of the token states (no Ray)."""

from __future__ import annotations

import pytest
import torch

from ptm_ray.config import load_config
from ptm_ray.models import resolve_model
from ptm_ray.models.pooling import POOLING_KEY

LABELS = ["a", "b", "c"]
SHORT, LONG = "refund please", "where is my order, it has been three weeks and nobody answers my emails at all"


def _built(model_dir: str, pooling: str, *extra: str):
    cfg = load_config(None, ["data.train=unused", f"model.name=hf:{model_dir}", f"model.pooling={pooling}", *extra])
    family, ref = resolve_model(cfg.model)
    torch.manual_seed(0)
    model = family.build(ref, LABELS, cfg.model, "classifier").eval()
    return family, model, family.preprocessor(ref, model, cfg)


def test_mean_pooling_feeds_the_models_own_head_the_masked_mean(tiny_text):
    _, mean_model, preprocessor = _built(tiny_text["bert"], "mean")
    _, cls_model, _ = _built(tiny_text["bert"], "cls")
    cls_model.load_state_dict(mean_model.state_dict())  # the same weights; only the pooling differs
    inputs = preprocessor([SHORT, LONG])
    with torch.no_grad():
        hidden = cls_model.bert(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1)
        # BERT's head: pooler (dense + tanh over the first position) -> dropout -> classifier
        expected = cls_model.classifier(cls_model.bert.pooler(torch.cat([mean[:, None], hidden[:, 1:]], 1)))
        assert torch.allclose(mean_model(**inputs).logits, expected, atol=1e-5)
        assert not torch.allclose(cls_model(**inputs).logits, expected, atol=1e-3)  # cls reads the first token
        # padding does not move the mean (bug guarded: the mask ignored, padded positions averaged in)
        alone = mean_model(**preprocessor([SHORT])).logits[0]
        assert torch.allclose(mean_model(**inputs).logits[0], alone, atol=1e-5)
    assert mean_model.config.to_dict()[POOLING_KEY] == "mean" and cls_model.config.to_dict()[POOLING_KEY] == "cls"


def test_mean_pooling_survives_save_and_load(tiny_text, tmp_path):
    family, model, preprocessor = _built(tiny_text["bert"], "mean")
    family.save(model, tmp_path / "model")
    loaded = family.load(tmp_path / "model").eval()
    inputs = preprocessor([SHORT, LONG])
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, model(**inputs).logits, atol=1e-6)


def test_mean_pooling_is_refused_where_it_means_nothing(tiny_text):
    from ptm_ray.train import plan_run

    with pytest.raises(ValueError, match=r"^model.pooling=mean is for the classifier of a text encoder .* is a 'gpt2' "
                                         r"model and model.task=classification: use model.pooling=cls$"):
        _built(tiny_text["gpt2"], "mean")
    cfg = load_config(None, ["data.train=unused", "model.name=timm:test_resnet", "model.weights=none",
                             "model.pooling=mean"])
    with pytest.raises(ValueError, match=r"^model.pooling=mean is for Hugging Face text encoders; timm models"):
        plan_run(cfg)
    with pytest.raises(ValueError, match=r"^model.pooling='max' is not allowed; choose one of cls, mean$"):
        load_config(None, ["data.train=unused", "model.name=minilm-l6", "model.pooling=max"])


@pytest.mark.parametrize("depth", [1, 2, "all"])
def test_the_feature_cache_split_pools_as_the_whole_model_does(tiny_text, depth):
    # the cache runs the frozen layers itself (not through model.forward): the pooling hook must get the mask there
    family, model, preprocessor = _built(tiny_text["bert"], "mean")
    depth = len(family.blocks(model)) if depth == "all" else depth
    inputs = preprocessor([SHORT, LONG])
    with torch.no_grad():
        features = family.prefix_forward(model, inputs, depth)
        model(**preprocessor(["an unrelated batch of one"]))  # leaves another batch's mask behind
        assert torch.allclose(family.suffix_logits(model, features, depth), model(**inputs).logits, atol=1e-5)
