"""Physical pruning: a smaller BertForPreTraining holding only the ticket's heads and FFN neurons.

The fused qkv Linear's output rows are laid out as [3 (q, k, v), heads, head_dim]; attn_out's input columns as
[heads, head_dim]. A kept unit's slimming coefficient c multiplies its output before attn_out / ffn_out, so folding
c into those columns gives a model without coefficients that computes exactly what the masked full model computes.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from ds_pld.earlybert.ticket import Ticket
from ds_pld.models.bert import BertForPreTraining

LAYER_PREFIX = "encoder.layers."
LAYER_KEYS = ("attn_norm.weight", "attn_norm.bias", "qkv.weight", "qkv.bias", "attn_out.weight", "attn_out.bias",
              "ffn_norm.weight", "ffn_norm.bias", "ffn_in.weight", "ffn_in.bias", "ffn_out.weight", "ffn_out.bias")
COEF_KEYS = ("head_coef", "ffn_coef")


def prune_layer_state(layer_state: Mapping[str, torch.Tensor], heads: Sequence[int], neurons: Sequence[int],
                      head_dim: int, fold: bool = True) -> dict[str, torch.Tensor]:
    """Slice one PreLNLayer's state (keys relative to the layer: 'qkv.weight', ..., optionally 'head_coef' /
    'ffn_coef') down to the kept heads and neurons, whose indices are relative to this state's widths. With `fold`,
    the kept units' coefficients (1 when the state has none) are multiplied into attn_out / ffn_out columns. The
    result has no coefficient keys: it loads into a layer built with slimming=False."""
    missing = [k for k in LAYER_KEYS if k not in layer_state]
    if missing:
        raise KeyError(f"layer state lacks {missing}")
    qkv_w, qkv_b = layer_state["qkv.weight"], layer_state["qkv.bias"]
    num_heads = qkv_w.shape[0] // (3 * head_dim)
    hidden = qkv_w.shape[1]
    intermediate = layer_state["ffn_in.weight"].shape[0]
    heads_t = _index(heads, num_heads, "head")
    neurons_t = _index(neurons, intermediate, "neuron")
    kept_h = heads_t.numel()
    out = {k: layer_state[k].clone() for k in ("attn_norm.weight", "attn_norm.bias", "attn_out.bias",
                                               "ffn_norm.weight", "ffn_norm.bias", "ffn_out.bias")}
    rows = 3 * kept_h * head_dim
    out["qkv.weight"] = qkv_w.reshape(3, num_heads, head_dim, hidden)[:, heads_t].reshape(rows, hidden)
    out["qkv.bias"] = qkv_b.reshape(3, num_heads, head_dim)[:, heads_t].reshape(rows)
    attn_out = layer_state["attn_out.weight"].reshape(hidden, num_heads, head_dim)[:, heads_t]
    ffn_out = layer_state["ffn_out.weight"][:, neurons_t]
    if fold and layer_state.get("head_coef") is not None:
        coef = layer_state["head_coef"][heads_t]
        attn_out = attn_out * coef.to(attn_out.dtype).view(1, kept_h, 1)
    if fold and layer_state.get("ffn_coef") is not None:
        ffn_out = ffn_out * layer_state["ffn_coef"][neurons_t].to(ffn_out.dtype).view(1, -1)
    out["attn_out.weight"] = attn_out.reshape(hidden, kept_h * head_dim).contiguous()
    out["ffn_in.weight"] = layer_state["ffn_in.weight"][neurons_t].contiguous()
    out["ffn_in.bias"] = layer_state["ffn_in.bias"][neurons_t].contiguous()
    out["ffn_out.weight"] = ffn_out.contiguous()
    return out


def _index(kept: Sequence[int], width: int, what: str) -> torch.Tensor:
    index = torch.as_tensor(list(kept), dtype=torch.long)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= width):
        raise ValueError(f"{what} indices {list(kept)} out of range for width {width}")
    if index.unique().numel() != index.numel():
        raise ValueError(f"{what} indices {list(kept)} repeat")
    return index.sort().values


def _strip_module_prefix(state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _encoder_prefix(keys: Iterable[str]) -> str:
    """What stands before 'encoder.layers.' in the keys: '' for a BertForPreTraining, 'bert.' for a model that wraps
    one (a GLUE classifier), so one pruning serves both."""
    prefixes = {key[:key.index(LAYER_PREFIX)] for key in keys if LAYER_PREFIX in key}
    if len(prefixes) != 1:
        raise ValueError(f"expected the layers of one encoder ('...{LAYER_PREFIX}N.'), found prefixes {prefixes}")
    return prefixes.pop()


def prune_state_dict(source: Mapping[str, torch.Tensor], ticket: Ticket, num_layers: int, head_dim: int
                     ) -> dict[str, torch.Tensor]:
    """The slim model's state from a full (slimming) one: layers sliced to the ticket with coefficients folded in,
    every other entry (embeddings, heads, a wrapper's own parameters) copied."""
    if ticket.num_layers != num_layers:
        raise ValueError(f"ticket has {ticket.num_layers} layers, the model {num_layers}")
    source = _strip_module_prefix(source)
    layers = _encoder_prefix(source) + LAYER_PREFIX
    new_state = {key: value.detach().clone() for key, value in source.items() if not key.startswith(layers)}
    for i in range(num_layers):
        prefix = f"{layers}{i}."
        layer_state = {key: source[prefix + key] for key in (*LAYER_KEYS, *COEF_KEYS) if prefix + key in source}
        pruned = prune_layer_state(layer_state, ticket.heads[i], ticket.neurons[i], head_dim)
        new_state.update({prefix + key: value for key, value in pruned.items()})
    return new_state


def prune_moments(moments: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor], ticket: Ticket,
                  num_layers: int, head_dim: int, power: int) -> dict[str, torch.Tensor]:
    """Adam's moments of the full model sliced like its weights, for the slim model.

    Folding multiplies a kept unit's attn_out / ffn_out columns by its coefficient c, which divides their
    gradients by c; the first moment (power 1) is folded with 1/c, the second (power 2) with 1/c^2, so the carried
    moments are those the slim model's own gradients would have built."""
    weights = _strip_module_prefix(weights)
    source = dict(_strip_module_prefix(moments))
    for key, coef in weights.items():
        if LAYER_PREFIX in key and key.rsplit(".", 1)[-1] in COEF_KEYS:
            safe = torch.where(coef.abs() < 1e-6, torch.full_like(coef, 1e-6), coef)
            source[key] = safe.float().reciprocal() ** power
    return prune_state_dict(source, ticket, num_layers, head_dim)


def prune_adam_moments(moments: Mapping[str, Mapping[str, torch.Tensor]], weights: Mapping[str, torch.Tensor],
                       ticket: Ticket, config) -> dict[str, dict[str, torch.Tensor]]:
    """`{name: {"exp_avg", "exp_avg_sq"}}` of the full model -> the same for the slim model (`prune_moments`)."""
    sliced = {key: prune_moments({name: state[key] for name, state in moments.items()}, weights, ticket,
                                 config.num_layers, config.head_dim, power)
              for key, power in (("exp_avg", 1), ("exp_avg_sq", 2))}
    return {name: {key: sliced[key][name] for key in sliced} for name in sliced["exp_avg"]}


def prune_model(model: BertForPreTraining, ticket: Ticket, state_dict: Mapping[str, torch.Tensor] | None = None
                ) -> BertForPreTraining:
    """A physically smaller model (`layer_heads` / `layer_intermediate` from the ticket, slimming=False).

    Weights come from `state_dict` when given (rewinding: the weights saved before the search), else from `model`
    (continuing from the drawn weights). The kept units' coefficients of that source are folded into attn_out /
    ffn_out, so continuing gives exactly the masked full model; when rewinding they are the rewind state's
    coefficients, which are 1.0 at search start, so the fold changes nothing. The new model is on the source
    model's device, in its parameter dtype, and in its train/eval mode."""
    config = model.config
    source = state_dict if state_dict is not None else model.state_dict()
    new_state = prune_state_dict(source, ticket, config.num_layers, config.head_dim)
    new_config = config.with_updates(layer_heads=ticket.layer_heads, layer_intermediate=ticket.layer_intermediate,
                                     slimming=False)
    param = next(model.parameters())
    with torch.device("meta"):
        slim = BertForPreTraining(new_config)
    # assign=True: the meta model takes the new tensors as they are (no second copy of a large model).
    slim.load_state_dict({k: v.detach().contiguous() for k, v in new_state.items()}, strict=True, assign=True)
    slim = slim.to(device=param.device)
    if param.is_floating_point():
        slim = slim.to(dtype=param.dtype)
    return slim.train(model.training)
