"""The router-logits shim: an MoE model whose transformers release does not record router logits (Granite MoE in
5.17) gets them recorded, so its load-balancing loss is a real tensor, not the int 0 that crashed TRL's logging."""

import pytest
import torch


def test_a_model_that_does_not_record_router_logits_records_them_after_the_shim(monkeypatch):
    # imported here, not at collection, as every training-side module (see test_train_diagnostics.py)
    from transformers.models.granitemoe import modeling_granitemoe as granite

    from fmsaccel_cli.models import build_config
    from fmsaccel_cli.moe_compat import record_router_logits

    declared = dict(granite.GraniteMoePreTrainedModel._can_record_outputs)
    without = {k: v for k, v in declared.items() if k != "router_logits"}
    monkeypatch.setattr(granite.GraniteMoePreTrainedModel, "_can_record_outputs", without)  # as 5.17 declares
    config = build_config("tiny-granitemoe", {"output_router_logits": True})
    torch.manual_seed(0)
    model = granite.GraniteMoeForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (2, 7))
    assert not torch.is_tensor(model(input_ids=ids).aux_loss)  # the int 0 (with labels, transformers crashes)
    record_router_logits(model)
    after = model(input_ids=ids, labels=ids)
    assert torch.is_tensor(after.aux_loss) and after.aux_loss.item() > 0
    assert len(after.router_logits) == config.num_hidden_layers
    assert after.router_logits[0].shape == (2 * 7, config.num_local_experts)
    cross_entropy = model(input_ids=ids, labels=ids, output_router_logits=False).loss
    expected = cross_entropy + config.router_aux_loss_coef * after.aux_loss
    assert after.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_model_that_records_router_logits_is_left_alone(capsys):
    from transformers.models.granitemoe import modeling_granitemoe as granite

    from fmsaccel_cli.models import build_config
    from fmsaccel_cli.moe_compat import record_router_logits

    model = granite.GraniteMoeForCausalLM(build_config("tiny-granitemoe"))
    if "router_logits" not in granite.GraniteMoePreTrainedModel._can_record_outputs:
        pytest.skip("this transformers release does not declare Granite MoE router logits")
    record_router_logits(model)
    assert "router logits" not in capsys.readouterr().out
