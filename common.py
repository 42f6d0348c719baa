"""common.py: the only module the stages share. The method's shared parts first, then plumbing a reader can skip.

The core
    distributed + FSDP2   setup_distributed, cleanup_distributed, decoder_layers, use_bf16, score_head, shard_model
                          (bf16: fp32 master weights and score heads), gathered_for_generation, all_reduce,
                          gather_objects
    models                TOKENIZER_FILES, load_tokenizer, has_tokenizer, same_tokenizer, has_weights, disable_dropout,
                          load_causal_lm, convert_beaver_score_state_dict, load_score_model, cost_groups_of,
                          full_state_dict, save_hf; what a score model reads: score_model_text_ids, end_scores;
                          how it is scored: preference_hits, sign_hits
    math (paper §3.3)     masked_mean, gae, LagrangeMultiplier, PIDLagrangian
    generation            top_p_filter, sample_responses, decode_responses, generate_texts
    data                  FIELDS, UNLABELLED_OK, CHOICES, HARM_CATEGORIES, parse_cost_groups, group_labels, HH_TURN,
                          from_chosen_rejected, from_alpaca, validate_row, load_rows (validated up front),
                          PROMPT_TEMPLATE, format_prompt, tokenize_prompt, tokenize_prompt_response, cut_response, pad,
                          length_mask, tokenize_sft_rows, sft_batch, lm_nll
    training              plan_steps, batch_indices, adamw, cosine_schedule, check_finite
Plumbing
    errors and output     UserError, entrypoint, is_rank0, print0
    command line          field_help, build_parser, parse_args
    paths and the hub     HERE, is_hub_name, WRITTEN_BY, check_path
    output folder, logs   check_output_dir, prepare_output_dir, MetricsLogger, StepTimer, progress
    the tiny task's judge TINY_TASK_DATA, load_judge (its report: data/tiny_safety.py report, group_items)
    resume and signals    CHECKPOINTS, checkpoint_dirs, resolve_resume, save_checkpoint, checkpoint_state,
                          OBJECTIVE_KEYS, ADDED_LATER, load_checkpoint, StopOnSignal (SIGTERM)

Conventions: every mask is built from explicit lengths (never by comparing ids with the pad id, since
pad == eos in Llama-3/Qwen tokenizers); cost > 0 means unsafe. tests/test_common.py keeps this index complete.
"""
import base64
import datetime
import functools
import glob
import json
import math
import os
import pickle
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

PROMPT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"  # Beaver / alpaca-7b-reproduced
HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- distributed + FSDP2
_MESH = None


def setup_distributed(timeout_s=600):
    """-> (rank, world_size, device). Works under torchrun and as plain `python` (a 1-rank group), so
    every stage has one code path: always a process group, always FSDP2. gloo on CPU, nccl on CUDA."""
    global _MESH
    if "RANK" not in os.environ:  # plain python: a 1-process group on a free local port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)  # before init_process_group (torchtitan does the same)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        # A finite timeout turns a hung collective (one rank died, ranks disagree) into an error.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    from torch.distributed.device_mesh import init_device_mesh
    _MESH = init_device_mesh(device.type, (world,))
    return rank, world, device


def cleanup_distributed():
    if dist.is_initialized():
        dist.barrier()  # without it a fast rank can tear the group down under a slow one
        dist.destroy_process_group()


def decoder_layers(model):
    """The ModuleList of transformer blocks of an HF decoder (Llama, Qwen2, Mistral, ...)."""
    base = getattr(model, model.base_model_prefix, model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise UserError(f"cannot find decoder layers in {type(model).__name__}")
    return layers


def use_bf16(flag, device):
    """--bf16 of every stage: None (the default) = on for CUDA, off on CPU (so the tiny CPU default and every bitwise
    test keep their fp32 numbers); True/False force it on any device (this CPU has avx512_bf16: bf16 matmuls ~2.5x
    fp32, README "Performance")."""
    return device.type == "cuda" if flag is None else bool(flag)


def score_head(model):
    """The linear head of a score model (AutoModelForTokenClassification: `score` in Llama/Qwen2/Mistral, `classifier`
    in others), or None for a causal LM."""
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            return head
    return None


def shard_model(model, device, mixed_precision=False, activation_checkpointing=False, compile=False, offload=False,
                store_bf16=False):
    """FSDP2: fully_shard each decoder block, then the root (torchtitan's recipe). Frozen models are sharded the same way.
    mixed_precision (--bf16): MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): the sharded parameters (the
    master weights the optimiser updates, and what is saved) stay fp32, FSDP2 casts them to bf16 when it all-gathers
    them, the whole forward and backward run in bf16, and gradients are reduced and kept in fp32. Chosen over autocast
    on evidence (bench/bench_bf16.py): one cast per all-gather instead of one per op, bf16 activations (half the
    memory), and it is what a GPU run uses (torchtitan). What stays fp32 under it:
      - a score model's head (reward, cost, critics): an FSDP2 unit of its own with param_dtype fp32, which casts its
        input (the last hidden state) to fp32, so every score and value is computed and returned in fp32;
      - log-probs: every caller upcasts the logits with .float() before the log-softmax (response_logprobs, lm_nll,
        sample_responses); KL, GAE, group advantages, λ and every loss reduction then run on fp32 tensors.
    store_bf16 (frozen models under --bf16): the parameters themselves are stored in bf16 (the head's in fp32), half
    the memory; a forward gives the same numbers as fp32 storage under the policy (FSDP2 rounds fp32 to bf16 the same
    way), so the reference equals the actor at step 0 (KL exactly 0). Buffers (rotary inv_freq) stay fp32.
    compile: torch.compile each block before sharding (torchtitan's order: FSDP's hooks stay outside the compiled
    graph); dynamic shapes, since batches and rollouts vary in length. offload: FSDP2 CPUOffloadPolicy, the shards
    live in (pinned) CPU memory and are copied to the GPU only for the all-gather of a forward, so a frozen model
    costs no GPU memory between uses."""
    import warnings
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    # FSDP2 warns when a root returns a view (a score model's logits): an in-place op on it would skip the
    # pre-backward hook. Nothing here modifies a model output in place (every use is out-of-place: slicing, gather,
    # arithmetic), so the warning is noise on every PPO run.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    off = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    head = score_head(model)
    if mixed_precision and store_bf16:
        keep = {id(p) for p in head.parameters()} if head is not None else set()
        for p in model.parameters():
            if id(p) not in keep:
                p.data = p.data.to(torch.bfloat16)
    model.to("cpu" if offload else device)
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        if activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
            layer = checkpoint_wrapper(layer)
        if compile:
            layer = torch.compile(layer, dynamic=True)
        layers[i] = layer
        fully_shard(layer, mesh=_MESH, mp_policy=mp, offload_policy=off)
    if mixed_precision and head is not None:  # scores in fp32: the head's unit casts its input up, computes in fp32
        fully_shard(head, mesh=_MESH, offload_policy=off,
                    mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32))
    fully_shard(model, mesh=_MESH, mp_policy=mp, offload_policy=off)
    return model


class gathered_for_generation:
    """Unshard every FSDP unit once, keep it unsharded for all decode steps, reshard at the end. Without this
    FSDP2 all-gathers every layer on every generated token (DESIGN.md §5). While inside, the units' forward hooks
    are detached: with the parameters already gathered they have nothing to do, yet they cost ~15% of a decode
    step of a small model (bench/bench_generation.py); they are restored, in order, on exit."""
    HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
             "_forward_hooks_always_called")

    def __init__(self, model):
        from torch.distributed.fsdp import FSDPModule
        self.model = model
        self.units = [m for m in model.modules() if isinstance(m, FSDPModule)]

    def __enter__(self):
        self.saved = []
        for m in self.units:
            m.unshard()  # all-gather now, once (waits for it)
            m.set_reshard_after_forward(False, recurse=False)
            self.saved.append({h: getattr(m, h).copy() for h in self.HOOKS})
            for h in self.HOOKS:
                getattr(m, h).clear()
        return self.model

    def __exit__(self, *exc):
        for m, saved in zip(self.units, self.saved):
            for h in self.HOOKS:
                getattr(m, h).update(saved[h])
            m.set_reshard_after_forward(m is not self.model, recurse=False)  # root stays unsharded, as default
            m.reshard()


def all_reduce(x, op="sum"):
    """all-reduce a python number or tensor across ranks (float64 on CPU: exact sums)."""
    t = torch.as_tensor(x, dtype=torch.float64).clone()
    if not dist.is_initialized():  # a single process (unit tests, notebooks)
        return t if t.dim() else t.item()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t = t.to(dev)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t.cpu() if t.dim() else t.item()


def gather_objects(objs):
    """all_gather_object of one python list per rank -> concatenated in rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(objs)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(objs))
    return [o for p in parts for o in p]


# ----------------------------------------------------------------------------- models, tokenizers, what a score model reads
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tiktoken.model")


def load_tokenizer(path, trust_remote_code=False, padding_side="right"):
    """AutoTokenizer; a pad token distinct from EOS is added when the tokenizer has none."""
    from transformers import AutoTokenizer
    _check_model_path(path)
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise UserError(f"model folder {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load a tokenizer from {path}: {_first_line(e)}") from None
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<pad>"})
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer in {path} has no EOS token")
    tok.padding_side = padding_side
    return tok


def has_tokenizer(path):
    """A hub name, or a local folder that holds tokenizer files."""
    return not os.path.isdir(path) or any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES)


def same_tokenizer(a, b):
    """Do two tokenizers turn text into the same ids (same vocabulary, same EOS)? Then models trained with either read
    each other's ids; otherwise text must be re-tokenised (safe-rlhf's is_same_tokenizer, the same test)."""
    return a is b or (a.eos_token_id == b.eos_token_id and len(a) == len(b) and a.get_vocab() == b.get_vocab())


def has_weights(path):
    return os.path.isdir(path) and bool(glob.glob(os.path.join(path, "*.safetensors")))


def _no_pickles(path):
    if os.path.isdir(path) and not has_weights(path) and glob.glob(os.path.join(path, "*.bin")):
        raise UserError(f"{path} holds weights only as pickle (*.bin); convert them to safetensors")


def _is_dropout_field(name, value):
    return ("dropout" in name or name.endswith("pdrop")) and isinstance(value, float) and not isinstance(value, bool)


def disable_dropout(model):
    """Dropout off everywhere in RL and in score models (RLHF-DETAILS 10): log-probs and scores must be
    deterministic functions of the tokens, or the first PPO ratio is not 1. Three places hold dropout: nn.Dropout
    modules; plain float attributes read inside forward, e.g. Llama/Qwen/Mistral's `attention_dropout`, which SDPA
    applies in train mode (0.1 makes two train-mode forwards differ by up to 0.74); and the config (every
    `*dropout*` / `*pdrop` field, nested configs too), so a saved model and anything built from it stay off."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for name, value in list(vars(m).items()):
            if _is_dropout_field(name, value):
                setattr(m, name, 0.0)
    configs = [getattr(model, "config", None)]
    while configs:
        cfg = configs.pop()
        if cfg is None:
            continue
        for name, value in list(vars(cfg).items()):
            if _is_dropout_field(name, value):
                setattr(cfg, name, 0.0)
            elif hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a nested config (text_config, ...)
                configs.append(value)
    return model


def _resize(model, tokenizer):
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id


def load_causal_lm(path, tokenizer, seed=0, trust_remote_code=False, dtype=torch.float32):
    """AutoModelForCausalLM from an HF folder or hub name. A folder with a config and no weights (the tiny
    default in assets/) is initialised from its config with `seed`, and the log says so."""
    from transformers import AutoConfig, AutoModelForCausalLM
    _check_model_path(path)
    _no_pickles(path)
    try:
        if os.path.isdir(path) and not has_weights(path):
            print0(f"[model] {path} has no weights: initialising {path}/config.json from seed {seed}")
            torch.manual_seed(seed)
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                         trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:  # custom code without --trust_remote_code, unknown model type, ...
        raise UserError(f"cannot load a causal LM from {path}: {_first_line(e)}") from None
    _resize(model, tokenizer)
    return model


def convert_beaver_score_state_dict(state_dict):
    """safe-rlhf's LlamaForScore (Beaver reward/cost models) -> our AutoModelForTokenClassification layout.
    Theirs: backbone `model.*`, head `score_head` (Linear hidden->1, bias off by default), running score
    statistics in `normalizer.{mean,var,count}` buffers. Ours: the same backbone, head `score` (with bias).
    -> (state_dict, {"score_mean", "score_std"} or {})."""
    out, stats = {}, {}
    for k, v in state_dict.items():
        if k.startswith("normalizer."):
            if k.endswith(".mean"):
                stats["score_mean"] = float(v.flatten()[0])
            elif k.endswith(".var"):
                stats["score_std"] = float(v.flatten()[0]) ** 0.5
            continue
        out[k.replace("score_head.", "score.", 1) if k.startswith("score_head.") else k] = v
    if "score.weight" in out and "score.bias" not in out:
        out["score.bias"] = torch.zeros(out["score.weight"].shape[0], dtype=out["score.weight"].dtype)
    return out, stats


def load_score_model(path, tokenizer, seed=0, trust_remote_code=False, dtype=torch.float32, cost_groups=None):
    """AutoModelForTokenClassification with one label: a score per token (DESIGN.md §4). Loads from a score
    model folder, from a causal-LM folder (head freshly initialised with `seed`), or from a safe-rlhf
    LlamaForScore folder (Beaver reward/cost models; converted with convert_beaver_score_state_dict).
    Several constraints: a cost model with `cost_groups` [[name, [categories]], ...] in its config has one output per
    group (num_labels = K); `cost_groups` here builds such a head on a model that has none (train_preference.py)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForTokenClassification
    _check_model_path(path)
    _no_pickles(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load a score model from {path}: {_first_line(e)}") from None
    have = getattr(config, "cost_groups", None)
    if cost_groups and have and [list(g) for g in have] != [list(g) for g in cost_groups]:
        raise UserError(f"{path} already has cost groups {[g[0] for g in have]}; --cost_categories asks for "
                        f"{[g[0] for g in cost_groups]} (start from the SFT model to train new heads)")
    if cost_groups and not have:
        config.cost_groups = [list(g) for g in cost_groups]
    config.num_labels = len(getattr(config, "cost_groups", None) or [0])  # one score per cost group, else one
    if getattr(config, "cost_groups", None):
        config.id2label = {i: g[0] for i, g in enumerate(config.cost_groups)}
        config.label2id = {g[0]: i for i, g in enumerate(config.cost_groups)}
    config.classifier_dropout = 0.0  # HF's head dropout is 0.1 by default: off for score models
    arch = (getattr(config, "architectures", None) or [""])[0]
    torch.manual_seed(seed)
    if arch.endswith("ForScore"):  # Beaver: build our class, then map the checkpoint's keys
        config.architectures = [arch.replace("ForScore", "ForTokenClassification")]
        model = AutoModelForTokenClassification.from_config(config, dtype=dtype)
        sd = {}
        for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
            sd.update(load_file(f))
        sd, stats = convert_beaver_score_state_dict(sd)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if [m for m in missing if "rotary" not in m] or unexpected:
            raise UserError(f"{path}: not a LlamaForScore checkpoint (missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]})")
        for k, v in stats.items():
            setattr(model.config, k, v)
    elif os.path.isdir(path) and not has_weights(path):
        print0(f"[model] {path} has no weights: initialising a score model from its config, seed {seed}")
        model = AutoModelForTokenClassification.from_config(config, dtype=dtype)
    else:
        model = AutoModelForTokenClassification.from_pretrained(path, config=config, dtype=dtype,
                                                                use_safetensors=True,
                                                                trust_remote_code=trust_remote_code)
    _resize(model, tokenizer)
    return disable_dropout(model)


def cost_groups_of(path, trust_remote_code=False):
    """The cost groups [(name, [categories])] a cost model was trained with (train_preference.py --cost_categories
    writes them into its config), or [] for a model with one overall cost."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError):
        return []  # load_score_model says why, in one line
    return [(g[0], list(g[1])) for g in getattr(config, "cost_groups", None) or []]


def full_state_dict(model):
    """Gather an FSDP2 model's full state dict onto rank 0's CPU (other ranks get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_hf(model, tokenizer, output_dir, extra_config=None):
    """Save an FSDP2-sharded model as an HF folder (safetensors) from rank 0. Files are written under temp
    names and renamed, config.json last, so a folder with config.json always holds a complete model."""
    from safetensors.torch import save_file
    sd = full_state_dict(model)  # collective: every rank must call it
    if is_rank0():
        os.makedirs(output_dir, exist_ok=True)
        sd = {k: v.contiguous() for k, v in sd.items()}
        if getattr(model.config, "tie_word_embeddings", False):
            sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
        tmp = os.path.join(output_dir, "model.safetensors.tmp")
        save_file(sd, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(output_dir, "model.safetensors"))
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        config = model.config
        config.architectures = [type(model).__name__.removeprefix("FSDP")]
        for k, v in (extra_config or {}).items():
            setattr(config, k, v)
        config.save_pretrained(os.path.join(output_dir, ".config_tmp"))
        os.replace(os.path.join(output_dir, ".config_tmp", "config.json"), os.path.join(output_dir, "config.json"))
        os.rmdir(os.path.join(output_dir, ".config_tmp"))
    if dist.is_initialized():
        dist.barrier()


def score_model_text_ids(tokenizer, prompt, response, ended, max_length=1 << 30, chat_template=False):
    """What a score model reads for an answer that reaches it as text (a score model whose tokenizer differs from the
    policy's: the text round trip safe-rlhf does) -> (prompt ids, response ids) in the score model's tokenizer and
    template. Its EOS is kept only when the policy ended the answer (`ended`): a cut-off answer is scored as cut off,
    not as if it had ended (the arena's cut-answer defect, issue 20). A prompt that fills max_length alone keeps its
    last max_length tokens and no response. Used by ppo_lagrangian.score_inputs and evaluate.answer_ids."""
    t = tokenize_prompt_response(tokenizer, prompt, response, max_length, chat_template)
    if t is None:
        return tokenize_prompt(tokenizer, prompt, chat_template)[-max_length:], []
    ids, plen, cut = t
    ids = ids if ended or cut else ids[:-1]  # a truncated answer lost its EOS already
    return ids[:plen], ids[plen:]


def end_scores(scores, end, heads=False):
    """A score model's output at each sequence's last token -> [N] float32, or [N, K] with heads (a grouped cost
    model: one output per group). scores: its logits [N, T, K]; end: the index of the last token of each row (the
    EOS where one was emitted), from explicit lengths, never from pad ids (pad == EOS in Llama-3/Qwen). The one rule
    for reward, cost and end values everywhere: train_preference.score_batch, ppo_lagrangian.score_rollout,
    evaluate.score_texts."""
    picked = scores.float()[torch.arange(len(scores), device=scores.device), end]
    return picked if heads else picked[:, 0]


def preference_hits(hi, lo, objective):
    """Per pair 1.0 where the score model orders it as the label does, else 0.0 (their mean: pairwise accuracy).
    hi: the better (reward, eq. 5) or the safer (cost, eq. 6) response's scores [N], lo: the other's. A reward must
    rank the better one higher; a cost must charge the unsafer one more. A tie counts as wrong. The one rule for
    train_preference.evaluate and evaluate.task_preference."""
    return (hi > lo if objective == "reward" else lo > hi).float()


def sign_hits(costs, is_safe):
    """Per response 1.0 where the cost's sign is its label (cost > 0 exactly on unsafe responses, the sign convention
    eq. 6's classification term trains), else 0.0; their mean: sign accuracy. costs [N] float, is_safe [N] bool."""
    return ((costs > 0) == ~is_safe).float()


# ----------------------------------------------------------------------------- math: GAE and the Lagrange multipliers (paper §3.3)
def masked_mean(x, mask):
    """Mean over each sequence's masked tokens, then over the batch: every sequence weighs the same."""
    per_seq = (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_seq.mean()


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al. 2016) over response positions, all [B, T].
    Episodic: the value after the last real token is 0; outside the mask the advantage is 0.
        δ_t = r_t + γ V_{t+1} − V_t,   A_t = δ_t + γλ A_{t+1},   returns G_t = A_t + V_t."""
    values, rewards = values * mask, rewards * mask
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)  # 0 after the end (masked)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


class LagrangeMultiplier:
    """λ = exp(log λ), learned by gradient ascent on the Lagrangian (paper §3, eq. 10):
        log λ ← log λ + lr · λ · (J_C − d)
    (the gradient of λ·(J_C − d) w.r.t. log λ, as safe-rlhf's optimiser step). λ grows while the mean episode
    cost J_C is above the threshold d and shrinks below it. Clamped to lambda_max (None: log λ <= LOG_LAMBDA_CAP,
    so exp never overflows); the first delay_steps calls do nothing (a warm-up for the cost critic)."""

    def __init__(self, lambda_init=1.0, lr=0.1, lambda_max=None, delay_steps=0):
        self.log_lambda = math.log(lambda_init)
        self.lr, self.lambda_max, self.delay_steps, self.calls = lr, lambda_max, delay_steps, 0

    @property
    def value(self):
        return math.exp(self.log_lambda)

    LOG_LAMBDA_CAP = 30.0  # λ <= e^30 ~ 1e13 when lambda_max is None: a long violation would overflow exp otherwise

    def update(self, episode_cost, threshold):
        self.calls += 1
        if self.calls > self.delay_steps:
            self.log_lambda += self.lr * self.value * (episode_cost - threshold)
            cap = math.log(self.lambda_max) if self.lambda_max is not None else self.LOG_LAMBDA_CAP
            self.log_lambda = min(self.log_lambda, cap)
        return self.value

    def state_dict(self):
        return {"log_lambda": self.log_lambda, "calls": self.calls}

    def load_state_dict(self, sd):
        self.log_lambda, self.calls = sd["log_lambda"], sd["calls"]


class PIDLagrangian:
    """PID Lagrangian (Stooke, Achiam & Abbeel 2020, Alg. 2): with the violation Δ = J_C − d,
        I ← max(0, I + Δ),   λ = clamp(K_p·Δ + K_i·I + K_d·max(0, J_C − J_C,prev), 0, lambda_max).
    The integral term alone is plain gradient ascent on λ; the proportional term reacts to the violation
    now, and the derivative term to its growth, which damps the overshoot and oscillation of pure ascent.
    I starts at lambda_init / K_i so λ starts at lambda_init."""

    def __init__(self, lambda_init=1.0, kp=0.5, ki=0.1, kd=0.5, lambda_max=None, delay_steps=0):
        self.kp, self.ki, self.kd, self.lambda_max, self.delay_steps = kp, ki, kd, lambda_max, delay_steps
        self.integral = lambda_init / ki if ki > 0 else 0.0
        self.prev_cost, self.calls, self._value = None, 0, lambda_init

    @property
    def value(self):
        return self._value

    def update(self, episode_cost, threshold):
        self.calls += 1
        if self.calls <= self.delay_steps:
            return self._value
        delta = episode_cost - threshold
        self.integral = max(0.0, self.integral + delta)
        deriv = 0.0 if self.prev_cost is None else max(0.0, episode_cost - self.prev_cost)
        self.prev_cost = episode_cost
        lam = max(0.0, self.kp * delta + self.ki * self.integral + self.kd * deriv)
        self._value = min(lam, self.lambda_max) if self.lambda_max is not None else lam
        return self._value

    def state_dict(self):
        return {"integral": self.integral, "prev_cost": self.prev_cost, "calls": self.calls, "value": self._value}

    def load_state_dict(self, sd):
        self.integral, self.prev_cost, self.calls, self._value = sd["integral"], sd["prev_cost"], sd["calls"], sd["value"]


# ----------------------------------------------------------------------------- generation
def top_p_filter(logits, top_p):
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, idx = logits.sort(-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop = probs.cumsum(-1) - probs > top_p  # keep a token if the mass before it is below top_p
    sorted_logits[drop] = float("-inf")
    return logits.scatter(-1, idx, sorted_logits)


def _static_cache(model, length):
    """HF's StaticCache for `length` positions, or None (HF's default dynamic cache) for a model family without one."""
    from transformers import StaticCache
    try:
        return StaticCache(config=model.config, max_cache_len=length)
    except (TypeError, ValueError, NotImplementedError, AttributeError):
        return None


@torch.no_grad()
def sample_responses(model, prompt_ids, prompt_lens, eos_id, pad_id, max_new_tokens, temperature=1.0,
                     top_p=1.0, greedy=False, generator=None, sync_every=4):
    """Sample responses with the KV cache from left-padded prompts [B, P].
    -> (responses [B, max_new_tokens] right-padded with pad_id after EOS, lengths [B] incl. EOS, has_eos [B]).
    Every rank runs the same number of decode steps: the loop stops only when *all* ranks are done, so ranks stay
    in lock-step for any collective the model may run (RLHF-DETAILS 3). With several ranks they agree every
    `sync_every` steps, so up to sync_every − 1 steps after the last EOS are spent (their tokens are padding)."""
    B, P = prompt_ids.shape
    dev = prompt_ids.device
    multi_rank = dist.is_initialized() and dist.get_world_size() > 1
    prompt_mask = length_mask(prompt_lens.to(dev), P, start=P - prompt_lens.to(dev)).long()
    pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # position ids follow the mask (left padding)
    # the mask of the whole rollout, sliced each step; a static KV cache of the same length: no per-token
    # concatenation of every layer's keys and values (−15% decode time for a small model, bench_generation.py)
    full_mask = torch.cat([prompt_mask, torch.ones(B, max_new_tokens, dtype=torch.long, device=dev)], 1)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos, use_cache=True,
                cache=_static_cache(model, P + max_new_tokens))
    cache, next_pos = out.cache, pos[:, -1:] + 1
    logits = out.logits[:, -1].float()
    check_finite({"policy logits": logits}, "generation")  # multinomial would fail deep inside torch otherwise
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=dev)
    for t in range(max_new_tokens):
        if greedy:
            nxt = logits.argmax(-1)
        else:
            probs = top_p_filter(logits / temperature, top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens[:, t] = nxt
        just = (~done) & (nxt == eos_id)
        lengths[just] = t + 1
        done |= just
        if multi_rank:  # every rank asks at the same steps; asking every step costs ~10% (bench_generation)
            all_done = False
            if (t + 1) % sync_every == 0:
                flag = done.all().to(torch.int32).reshape(1)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                all_done = bool(flag.item())
        else:
            all_done = bool(done.all())
        if all_done or t == max_new_tokens - 1:
            break
        out = model(input_ids=nxt[:, None], attention_mask=full_mask[:, :P + t + 1], position_ids=next_pos,
                    cache=cache, use_cache=True)
        cache, next_pos, logits = out.cache, next_pos + 1, out.logits[:, -1].float()
    has_eos = done.clone()
    return tokens, lengths, has_eos


def decode_responses(tokenizer, responses, lengths, has_eos, n=None):
    """Response token rows -> text, without the EOS (lengths include it when present)."""
    return [tokenizer.decode(responses[i, :int(lengths[i]) - int(bool(has_eos[i]))].tolist(),
                             skip_special_tokens=True).strip() for i in range(len(responses) if n is None else n)]


def generate_texts(model, tokenizer, prompts, device, max_new_tokens=32, batch_size=32, greedy=True,
                   temperature=1.0, top_p=1.0, seed=0, chat_template=False, return_tokens=False, desc=None):
    """Answer a list of prompts (this rank's share) with an FSDP model, unsharded once per call. -> texts, or with
    return_tokens (texts, [(prompt ids, response ids as generated, ending in EOS only if one was emitted)]).
    desc: a progress bar over the batches on rank 0 (an evaluation of many prompts is a long loop)."""
    out, tokens = [], []
    gen = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    n = len(prompts)
    nb = all_reduce(math.ceil(n / batch_size), "max") if dist.is_initialized() else math.ceil(n / batch_size)
    with gathered_for_generation(model):
        for b in progress(range(int(nb)), desc=desc, leave=False) if desc else range(int(nb)):
            chunk = prompts[b * batch_size:(b + 1) * batch_size] or prompts[:1]  # keep lock-step on short ranks
            real = len(prompts[b * batch_size:(b + 1) * batch_size])
            pids = [tokenize_prompt(tokenizer, p, chat_template) for p in chunk]
            ids, lens = pad(pids, tokenizer.pad_token_id, "left")
            resp, rlen, has_eos = sample_responses(model, ids.to(device), lens.to(device), tokenizer.eos_token_id,
                                                   tokenizer.pad_token_id, max_new_tokens, temperature, top_p,
                                                   greedy=greedy, generator=gen)
            out += decode_responses(tokenizer, resp, rlen, has_eos, real)
            tokens += [(pids[i], resp[i, :int(rlen[i])].tolist()) for i in range(real)]
    model.train()
    return (out, tokens) if return_tokens else out


# ----------------------------------------------------------------------------- data
FIELDS = {  # kind -> {field: type}
    "sft": {"prompt": str, "response": str},
    "prompt": {"prompt": str},
    "reward": {"prompt": str, "response_0": str, "response_1": str, "better_response_id": int},
    "cost": {"prompt": str, "response_0": str, "response_1": str, "is_response_0_safe": bool,
             "is_response_1_safe": bool, "safer_response_id": int},
}
FIELDS["preference"] = {**FIELDS["reward"], **FIELDS["cost"]}
# A cost row may say null for a response's safety: a harmlessness order without per-response labels (HH-RLHF
# harmless-base's "chosen is less harmful", Bai et al. 2022). Eq. 6 then keeps the pairwise term for that pair and
# drops the classification term of each unlabelled response (train_preference.cost_loss); sign accuracy reads only
# labelled responses. Only the plain cost kind accepts it: a missing key is still a missing field, and harm
# categories (cost groups) or SafeDPO need the labels.
UNLABELLED_OK = ("is_response_0_safe", "is_response_1_safe")
FIELDS["xstest"] = {"prompt": str, "type": str, "label": str}  # XSTest prompts (evaluate.py --task xstest)
FIELDS["refusal_labelled"] = {"prompt": str, "completion": str, "final_label": str}  # answers with human labels


CHOICES = {"label": ("safe", "unsafe"), "final_label": ("1_full_compliance", "2_full_refusal", "3_partial_refusal")}
# several constraints (train_preference.py --cost_categories): PKU-SafeRLHF v1's per-response harm fields
FIELDS["cost_groups"] = {**FIELDS["cost"], "response_0_harm_category": dict, "response_1_harm_category": dict}
FIELDS["cost_severity"] = {**FIELDS["cost_groups"], "response_0_severity_level": int, "response_1_severity_level": int}


HARM_CATEGORIES = (  # PKU-SafeRLHF v1's 19 harm categories, in its order
    "Endangering National Security", "Insulting Behavior", "Discriminatory Behavior", "Endangering Public Health",
    "Copyright Issues", "Violence", "Drugs", "Privacy Violation", "Economic Crime", "Mental Manipulation",
    "Human Trafficking", "Physical Harm", "Sexual Content", "Cybercrime", "Disrupting Public Order",
    "Environmental Damage", "Psychological Harm", "White-Collar Crime", "Animal Abuse")


def parse_cost_groups(spec):
    """--cost_categories -> [(name, [categories])] (the order of the cost model's outputs), or [] for one overall cost.
    Comma-separated groups, each `name=Category A+Category B` or one category name (the group is named after it);
    `all` alone = the 19 categories, one group each; `all` inside a group = every category."""
    groups = []
    for item in [x.strip() for x in spec.split(",") if x.strip()]:
        if item == "all":
            groups += [(c, [c]) for c in HARM_CATEGORIES]
            continue
        name, eq, cats = item.partition("=")
        name, cats = name.strip(), [c.strip() for c in (cats if eq else item).split("+") if c.strip()]
        cats = list(HARM_CATEGORIES) if cats == ["all"] else cats
        bad = [c for c in cats if c not in HARM_CATEGORIES]
        if bad or not cats or not name:
            raise UserError(f"--cost_categories: {item!r}: unknown category {bad[0]!r} (the 19 PKU-SafeRLHF v1 names: "
                            f"{', '.join(HARM_CATEGORIES)})" if bad else f"--cost_categories: {item!r} names no category")
        groups.append((name, cats))
    names = [g[0] for g in groups]
    if len(set(names)) != len(names):
        raise UserError(f"--cost_categories: a group name appears twice: {names}")
    return groups


def group_labels(row, i, groups):
    """Is response i harmful in each group? -> [bool] * K (any of the group's categories is flagged)."""
    flags = row[f"response_{i}_harm_category"]
    return [any(flags[c] for c in cats) for _, cats in groups]


def _check_harm_fields(row):
    """The v1 harm fields of a row: 19 booleans per response, none set on a response flagged safe, severity 0-3."""
    for i in (0, 1):
        flags = row[f"response_{i}_harm_category"]
        missing = [c for c in HARM_CATEGORIES if c not in flags]
        if missing:
            return f"response_{i}_harm_category lacks the category '{missing[0]}'"
        bad = [c for c in HARM_CATEGORIES if not isinstance(flags[c], bool)]
        if bad:
            return f"response_{i}_harm_category['{bad[0]}'] must be true or false, got {flags[bad[0]]!r}"
        on = [c for c in HARM_CATEGORIES if flags[c]]
        if row[f"is_response_{i}_safe"] and on:
            return f"response_{i} is flagged safe but harmful in '{on[0]}'"
        key = f"response_{i}_severity_level"
        if key in row and (isinstance(row[key], bool) or row[key] not in (0, 1, 2, 3)):
            return f"field '{key}' must be 0, 1, 2 or 3, got {row[key]!r}"
    return None


def _read_local(path):
    """-> list of (row number, row dict or error string). Row numbers are 1-based lines for .jsonl."""
    if path.endswith((".jsonl", ".jsonl.gz")):
        import gzip
        out = []
        with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        out.append((i, json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path}: row {i}: malformed JSON ({e.msg})") from None
        return out
    if path.endswith(".json"):
        try:
            data = json.load(open(path))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: malformed JSON at line {e.lineno} ({e.msg})") from None
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON array of rows")
        return list(enumerate(data, 1))
    if path.endswith(".csv"):  # row N = the N-th data line after the header
        import csv
        with open(path, newline="") as f:
            return list(enumerate(csv.DictReader(f), 1))
    if path.endswith(".parquet"):
        import datasets
        return list(enumerate(datasets.load_dataset("parquet", data_files=path, split="train"), 1))
    raise UserError(f"{path}: unsupported file type (use .jsonl, .jsonl.gz, .json, .csv or .parquet)")


def _read_spec(spec, flag):
    spec = spec.strip()
    if os.path.isdir(spec):
        files = sorted(f for ext in ("jsonl", "jsonl.gz", "json", "csv", "parquet") for f in glob.glob(os.path.join(spec, f"*.{ext}")))
        if not files:
            raise UserError(f"{spec}: folder holds no .jsonl/.json/.parquet file")
        return [(f, r) for f in files for r in [_read_local(f)]]
    if os.path.exists(spec):
        return [(spec, _read_local(spec))]
    name, _, split = spec.partition(":")
    check_path(spec, flag, "data")
    import datasets  # a hub dataset `org/name:split` (never used by tests or the tiny demo)
    ds = datasets.load_dataset(name, split=split or "train")
    return [(spec, list(enumerate(ds, 1)))]


HH_TURN = "\n\nAssistant:"


def from_chosen_rejected(row):
    """A chosen/rejected row -> the PKU-SafeRLHF schema (response_0 = chosen, better_response_id = 0), or the reason
    it cannot be. Two forms: TRL's {"prompt", "chosen", "rejected"}, and HH-RLHF's {"chosen", "rejected"}, where each
    is a whole dialogue "\n\nHuman: ...\n\nAssistant: ..." and only the last Assistant turn differs. The prompt is
    then the dialogue before that turn, with its first "Human:" label dropped (the prompt template adds its own);
    earlier turns stay in the prompt as text."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        return None, "fields 'chosen' and 'rejected' must be strings (conversational lists are not supported)"
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            return None, f"field 'prompt' must be str, got {type(row['prompt']).__name__}"
        prompt, a, b = row["prompt"], chosen, rejected
    else:
        i, j = chosen.rfind(HH_TURN), rejected.rfind(HH_TURN)
        if i < 0 or j < 0:
            return None, "chosen/rejected without a prompt field must be HH-RLHF dialogues ending in an Assistant turn"
        if chosen[:i] != rejected[:j]:
            return None, "chosen and rejected differ before their last Assistant turn (not one dialogue)"
        prompt, a, b = chosen[:i].strip().removeprefix("Human:").strip(), chosen[i + len(HH_TURN):], rejected[j + len(HH_TURN):]
    extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
    return {**extra, "prompt": prompt, "response_0": a, "response_1": b, "better_response_id": 0, "response": a}, None


def from_alpaca(row):
    """An alpaca row {"instruction", "input", "output"} -> {"prompt", "response"}; a non-empty input follows the
    instruction after a blank line (alpaca's own layout)."""
    prompt = row["instruction"]
    if isinstance(prompt, str) and isinstance(row.get("input"), str) and row["input"].strip():
        prompt = f"{prompt}\n\n{row['input']}"
    return {**row, "prompt": prompt, "response": row["output"]}


def validate_row(row, kind):
    """-> None if the row is usable for `kind`, else the reason (DESIGN.md §3)."""
    if not isinstance(row, dict):
        return "row is not a JSON object"
    for field, typ in FIELDS[kind].items():
        if field in UNLABELLED_OK and field in row and row[field] is None:
            if kind == "cost":
                continue  # null = this response's safety is not labelled (a pairwise-only row; UNLABELLED_OK)
            return (f"field '{field}' is null (unlabelled safety): only the cost model without cost groups reads such "
                    f"rows, as a pairwise order")
        if field not in row or row[field] is None:
            return f"missing field '{field}'"
        v = row[field]
        if field.endswith("severity_level"):
            continue  # 0-3: _check_harm_fields
        if typ is int and (isinstance(v, bool) or not isinstance(v, int)):
            return f"field '{field}' must be 0 or 1, got {v!r}"
        if typ is not int and not isinstance(v, typ):
            return f"field '{field}' must be {typ.__name__}, got {type(v).__name__}"
        if typ is int and v not in (0, 1):
            return f"field '{field}' must be 0 or 1, got {v!r}"
        if typ is str and not v.strip():
            return f"field '{field}' is empty"
        if field in CHOICES and kind in ("xstest", "refusal_labelled") and v not in CHOICES[field]:
            return f"field '{field}' must be one of {', '.join(CHOICES[field])}, got {v!r}"
    if "response_0" in FIELDS[kind] and row["response_0"].strip() == row["response_1"].strip():
        return "response_0 and response_1 are identical"
    if "safer_response_id" in FIELDS[kind]:
        s = row["safer_response_id"]
        if row[f"is_response_{s}_safe"] is False and row[f"is_response_{1 - s}_safe"] is True:
            return (f"contradictory labels: safer_response_id={s} but response_{s} is flagged unsafe and "
                    f"response_{1 - s} safe")
    if "response_0_harm_category" in FIELDS[kind]:
        return _check_harm_fields(row)
    return None


def load_rows(specs, kind, skip_invalid=False, flag="the data flag"):
    """Load and validate every row before any training step. `specs`: comma-separated local files/folders or
    hub `org/name:split`. A bad row is an error naming the file and row (or, with skip_invalid, skipped and
    counted)."""
    rows, skipped = [], 0
    for spec in [s for s in specs.split(",") if s.strip()]:
        for source, numbered in _read_spec(spec, flag):
            if not numbered:
                raise UserError(f"{source}: file is empty")
            for i, row in numbered:
                err = None
                if isinstance(row, dict) and "chosen" in row and "rejected" in row and "response_0" not in row:
                    row, err = from_chosen_rejected(row)  # HH-RLHF / TRL preference rows
                elif isinstance(row, dict) and "instruction" in row and "output" in row and "prompt" not in row:
                    row = from_alpaca(row)  # SFT / PTX rows of alpaca (safe-rlhf's PTX data)
                err = err or validate_row(row, kind)
                if err and not skip_invalid:
                    raise UserError(f"{source}: row {i}: {err}")
                if err:
                    skipped += 1
                else:
                    rows.append(dict(row))
    if skipped:
        print0(f"[data] warning: skipped {skipped} invalid rows of {specs} (--skip_invalid_rows)")
    if not rows:
        raise UserError(f"{specs}: no usable rows")
    return rows


def format_prompt(prompt, tokenizer=None, chat_template=False):
    """The Beaver prompt template (DESIGN.md §3), or the tokenizer's own chat template with --chat_template."""
    if chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return PROMPT_TEMPLATE.format(prompt=prompt)


def tokenize_prompt(tokenizer, prompt, chat_template=False):
    return tokenizer(format_prompt(prompt, tokenizer, chat_template), add_special_tokens=not chat_template)["input_ids"]


def tokenize_prompt_response(tokenizer, prompt, response, max_length, chat_template=False, truncate_prompt=False,
                             prompt_ids=None):
    """-> (ids, prompt_len, truncated) or None when the prompt alone leaves no room for a response (or, with
    truncate_prompt, the prompt keeps its last max_length // 2 tokens, which hold the template's end).
    The response follows the template directly (leading space) and ends with EOS; the two parts are
    tokenised separately so the prompt length is exact. `prompt_ids`: the prompt already tokenised."""
    p = tokenize_prompt(tokenizer, prompt, chat_template) if prompt_ids is None else prompt_ids
    r = tokenizer(" " + response.strip() if not chat_template else response.strip(),
                  add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(p) >= max_length:
        if not truncate_prompt:
            return None
        p = p[len(p) - max_length // 2:]
    truncated = len(p) + len(r) > max_length
    return (p + r)[:max_length], len(p), truncated


def cut_response(r_ids, n, eos_id, append_eos=False):
    """A whole answer (its ids end in EOS) as a policy limited to n new tokens produces it: unchanged when it ends
    within n tokens, else its first n tokens, without EOS (what PPO with --max_new_tokens n scores) or, append_eos, with
    one (the cut answer scored as if it had ended). Measures how much of a score model's held-out accuracy survives the
    rollout length (README "Safe RLHF on SmolLM2": the cost model 73.5% -> 66.2% pairwise, 63.9% -> 58.4% sign at 64
    tokens; with the EOS appended 69.4% / 64.1%), and trains a score model on what such a policy's rollouts look like
    (train_preference.py --cut_response_tokens)."""
    if len(r_ids) <= n or (len(r_ids) == n + 1 and r_ids[-1] == eos_id):
        return r_ids
    return r_ids[:n] + ([eos_id] if append_eos else [])


def pad(seqs, pad_id, side="right"):
    """-> (ids [B, T], lengths [B]), padded on `side` (torch's pad_sequence). Masks are built from `lengths`, never from
    `ids == pad_id`."""
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(s, dtype=torch.long) for s in seqs], batch_first=True,
                                          padding_value=pad_id, padding_side=side)
    return ids, torch.tensor([len(s) for s in seqs])


def length_mask(lengths, T, start=None):
    """[B, T] float mask, 1 on positions start[b] <= t < start[b] + lengths[b] (start defaults to 0)."""
    t = torch.arange(T, device=lengths.device)[None]
    s = torch.zeros_like(lengths) if start is None else start
    return ((t >= s[:, None]) & (t < (s + lengths)[:, None])).float()


def tokenize_sft_rows(rows, tokenizer, max_length, chat_template, source, truncate_prompts=False):
    """-> list of (ids, prompt_len); prints how many responses were truncated and prompts dropped (or cut)."""
    out, truncated, long_prompts = [], 0, 0
    for r in rows:
        p = tokenize_prompt(tokenizer, r["prompt"], chat_template)
        long_prompts += len(p) >= max_length
        t = tokenize_prompt_response(tokenizer, r["prompt"], r["response"], max_length, chat_template, truncate_prompts, p)
        if t is not None:
            out.append(t[:2])
            truncated += t[2]
    print0(f"[data] {source}: {len(out)} rows, {truncated} responses truncated at max_length={max_length}, "
           f"{long_prompts} prompts longer than max_length " + ("cut to their last tokens" if truncate_prompts else
                                                               "dropped (--truncate_long_prompts keeps them)"))
    if not out:
        raise UserError(f"{source}: every prompt is longer than max_length={max_length}")
    return out


def sft_batch(examples, pad_id, include_prompt, device):
    """(ids, prompt_len) examples -> ids [B, T] and a target mask [B, T-1]: position t predicts token t+1 and
    counts when t+1 is a response token (or any real token after the first, with include_prompt)."""
    ids, lengths = pad([e[0] for e in examples], pad_id)
    plen = torch.tensor([1 if include_prompt else e[1] for e in examples])
    # targets j = t+1 run over [plen, length): a mask over targets, shifted back by one to positions t
    tgt = length_mask(lengths - plen, ids.shape[1], start=plen)[:, 1:]
    return ids.to(device), tgt.to(device)


def lm_nll(model, ids, tgt_mask):
    """Sum of next-token NLL over the masked targets, and their count (SFT loss; PPO's PTX loss)."""
    import torch.nn.functional as F
    logits = model(input_ids=ids).logits[:, :-1].float()  # right padding: causal attention keeps pads unseen
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return (nll.view_as(tgt_mask) * tgt_mask).sum(), tgt_mask.sum()


# ----------------------------------------------------------------------------- training
def plan_steps(n_rows, per_device, world, accum, epochs, max_steps, source, global_batch_size=0):
    """-> (global_batch, accum, steps_per_epoch, total_steps): the batch arithmetic of a supervised stage, checked
    once. With global_batch_size set, the accumulation steps are derived from it, so the same global batch (and the
    same run) can be resumed on another number of ranks."""
    if global_batch_size:
        if global_batch_size % (per_device * world):
            raise UserError(f"--global_batch_size {global_batch_size} is not divisible by world size {world} x "
                            f"per-device batch {per_device}")
        accum = global_batch_size // (per_device * world)
    global_batch = per_device * world * accum
    if n_rows < global_batch:
        raise UserError(f"{source}: {n_rows} rows < one global batch of {global_batch}")
    steps_per_epoch = n_rows // global_batch
    total = steps_per_epoch * epochs if max_steps < 0 else min(max_steps, steps_per_epoch * epochs)
    return global_batch, accum, steps_per_epoch, total


@functools.lru_cache(maxsize=2)
def _epoch_order(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def batch_indices(n, global_batch, rank, world, seed, step, steps_per_epoch):
    """This rank's share of the global batch of optimiser step `step` (0-based). The order is a seeded shuffle per
    epoch shared by all ranks (STYLE practice 5), and a pure function of the step: a resumed run needs no data
    state beyond the step count."""
    epoch, i = divmod(step, steps_per_epoch)
    order = _epoch_order(n, seed, epoch)
    return order[i * global_batch:(i + 1) * global_batch][rank::world]


def adamw(model, lr, weight_decay=0.0, betas=(0.9, 0.95)):
    """AdamW with betas (0.9, 0.95) as safe-rlhf (RLHF-DETAILS 18); weight decay on matrices only (not on norms and
    biases). FSDP2 parameters are DTensors, for which torch falls back to a per-tensor Python loop; the foreach
    (CPU) or fused (CUDA) kernels update all shards at once: −30% time per SFT step of the tiny model (bench/)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fast = {"fused": True} if torch.cuda.is_available() else {"foreach": True}
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, **fast)


def cosine_schedule(optimizer, warmup_steps, total_steps, min_ratio=0.0, kind="cosine"):
    """Linear warmup then cosine decay to min_ratio × lr (kind "constant": the full lr after the warmup). Not
    transformers' get_cosine_schedule_with_warmup: its warmup factor is step / warmup, so the first optimiser step
    runs at lr 0 (here (step + 1) / warmup); switching would waste a step and change every measured number."""
    def f(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        p = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def check_finite(values, where, same_on_all_ranks=False):
    """Stop the run (on every rank alike) when any of `values` (name -> number or tensor) is NaN or inf on any rank,
    before the step is applied: nothing non-finite reaches a checkpoint, and the last good one stays intact.
    same_on_all_ranks: the values are already global (an all-reduced loss, a clipped FSDP gradient norm), so every
    rank decides alike without another collective in the training step."""
    bad = [k for k, v in values.items() if not bool(torch.isfinite(torch.as_tensor(v, dtype=torch.float64)).all())]
    if (bool(bad) if same_on_all_ranks else all_reduce(float(bool(bad)), "max") > 0):
        raise UserError(f"non-finite {', '.join(bad) or 'value on another rank'} at {where}: stopping before the "
                        f"update; the newest checkpoint in {CHECKPOINTS}/ (if any) is the last good state")


# =============================================================================
# plumbing: errors, the command line, paths, the output folder, logging, the judge, resume checkpoints and
# signals. Every stage needs it; none of the method lives here. A reader can stop here.
# =============================================================================


# ----------------------------------------------------------------------------- errors and output
class UserError(Exception):
    """Something the user can fix (flags, paths, data). Printed as one line, exit code 1."""


def entrypoint(main):
    """Run a stage's main(): a UserError becomes one clear line and exit 1 on every rank, no traceback.
    A torchrun rank that finished (main has barriered and destroyed the process group) leaves with os._exit(0):
    at interpreter shutdown gloo's worker threads, still referenced by device meshes, are destroyed in no set order,
    and a rank could abort ("terminate called without an active exception") after a run that had succeeded."""
    try:
        main()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    except UserError as e:
        from tqdm import tqdm
        for bar in list(getattr(tqdm, "_instances", [])):  # close open bars first: the error is the last line
            bar.close()
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(1)


def is_rank0():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*a, **k):
    if is_rank0():
        print(*a, **k, flush=True)


# ----------------------------------------------------------------------------- command line
def field_help(dataclass_type):
    """{field: help text} from the trailing `# comment` of each field line of an Args dataclass: the comment a reader
    sees in the source is what `--help` prints, so the two cannot drift apart."""
    import inspect
    import io
    import tokenize
    out, line_name = {}, {}
    src = inspect.getsource(dataclass_type)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        row = tok.start[0]
        if tok.type == tokenize.NAME and row not in line_name and tok.start[1] == 4:  # a field starts its line
            line_name[row] = tok.string
        elif tok.type == tokenize.COMMENT and row in line_name:
            out[line_name[row]] = tok.string.lstrip("#").strip()
    return out


def build_parser(dataclass_type):
    """The stage's argument parser. `--help` shows, per flag, the comment on its line in Args, its default, and (for
    Literal[...] fields) the allowed values, which argparse enforces. A bad flag or value is one `error:` line
    (a UserError), not a usage dump."""
    import argparse
    from transformers import HfArgumentParser

    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    class Parser(HfArgumentParser):
        def error(self, message):
            raise UserError(f"{message} (see --help)")

    doc = sys.modules[dataclass_type.__module__].__doc__ or ""
    parser = Parser(dataclass_type, description=doc.strip(), formatter_class=Formatter)
    helps = field_help(dataclass_type)
    for action in parser._actions:
        if action.dest in helps:
            off = action.option_strings[0].startswith("--no_")  # HF's complement of a bool flag
            action.help = helps[action.dest].replace("%", "%%") + (" (this flag turns it off)" if off else "")
    return parser


def parse_args(dataclass_type, argv=None):
    """The stage's Args dataclass from the command line (see build_parser)."""
    args, rest = build_parser(dataclass_type).parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        raise UserError(f"unknown flag(s) {' '.join(rest)} (see --help)")
    return args


# ----------------------------------------------------------------------------- paths and the hub
def is_hub_name(s):
    """`org/name` (optionally `:split` for data): something to fetch from the hub rather than a local path."""
    import re
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.\[\]%:-]+)?", s) is not None \
        and not s.split(":")[0].endswith((".jsonl", ".gz", ".json", ".csv", ".parquet"))


# the stage that writes each default output folder, for "run X first" hints
WRITTEN_BY = {"sft": "sft.py", "reward": "train_preference.py --objective reward",
              "cost": "train_preference.py --objective cost", "ppo_lag": "ppo_lagrangian.py",
              "ppo": "ppo_lagrangian.py --algo ppo --output_dir output/ppo"}


def _hub_reachable(timeout=3.0):
    """Can this process reach the hub? One TCP connect (milliseconds when offline), instead of transformers' retries
    with back-off (five "Retrying in 8s" lines) before the same failure."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], int(host.split(":")[1]) if ":" in host else 443), timeout).close()
        return True
    except OSError:
        return False


def _hub_cached(name, repo_type="model"):
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(name, "config.json" if repo_type == "model" else "README.md",
                                                 repo_type=repo_type), str)
    except Exception:
        return False


def check_path(path, flag, what="model"):
    """A local folder/file, or a hub name the hub can serve now; otherwise one line that names the path, the stage
    that writes it (for our default output folders) and the flag to pass. Never a hub request for a folder that a
    stage was meant to write (`output/sft` is also a valid `org/name`)."""
    if os.path.exists(path):
        if what == "model" and os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
            raise UserError(f"model folder {path} has no config.json")
        return
    name = path.split(":")[0]
    first = name.split("/")[0]
    stage = WRITTEN_BY.get(os.path.basename(name.rstrip("/"))) if first == "output" else None
    if not is_hub_name(path) or first in ("output", ".", "..", "~") or os.path.isdir(first):
        hint = f"run {stage} first, or pass {flag}" if stage else f"pass {flag} with a local path or a hub name"
        raise UserError(f"{path} does not exist: {hint}")
    if not _hub_reachable() and not _hub_cached(name, "model" if what == "model" else "dataset"):
        raise UserError(f"{path} is not a local path, and the hub is unreachable from here (no network, or "
                        f"HF_HUB_OFFLINE set) with no cached copy: pass {flag} with a local path")


def _check_model_path(path, flag="--model_name_or_path"):
    check_path(path, flag, "model")


def _first_line(e):
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    msg = lines[0][:300] if lines else type(e).__name__
    if "custom code" in str(e) or "trust_remote_code" in str(e):
        msg += " (it ships its own Python code: pass --trust_remote_code only if you trust it)"
    return msg


# ----------------------------------------------------------------------------- output folder and logging
def check_output_dir(path, overwrite=False, resume=""):
    """Refuse to write into a folder that already holds a finished model, or the resume checkpoints of an
    unfinished run, unless --overwrite (start over) or --resume (continue)."""
    if os.path.exists(os.path.join(path, "config.json")) and not overwrite:
        raise UserError(f"{path} already holds a finished run (config.json); pass --overwrite to replace it")
    ckpts = checkpoint_dirs(path)
    if ckpts and not (overwrite or resume):
        raise UserError(f"{path} holds resume checkpoints of an unfinished run (newest {os.path.basename(ckpts[-1])}): "
                        f"pass --resume to continue it or --overwrite to start over")


def prepare_output_dir(path, resume_step=None):
    """The one place that changes what a run folder already holds, called when the run starts (every input has
    been validated, check_output_dir has refused a finished or unfinished run without --overwrite / --resume, and
    the resume checkpoint, if any, is loaded). A fresh run (resume_step None) removes what a previous run left:
    resume checkpoints, an old config.json (a folder is "finished" only when config.json exists, and save_hf writes
    it last, so stale weights never look finished) and metrics.jsonl. A resumed run keeps metrics.jsonl's rows up to
    resume_step (the later steps will be redone), so the log reads as if the run was never interrupted. Rank 0 acts;
    every rank waits for it."""
    if is_rank0():
        os.makedirs(path, exist_ok=True)
        log = os.path.join(path, "metrics.jsonl")
        if resume_step is None:
            import shutil
            shutil.rmtree(os.path.join(path, CHECKPOINTS), ignore_errors=True)
            for name in ("config.json", "metrics.jsonl"):
                if os.path.exists(os.path.join(path, name)):
                    os.remove(os.path.join(path, name))
        else:
            kept = [l for l in open(log) if json.loads(l)["step"] <= resume_step] if os.path.exists(log) else []
            with open(log + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(log + ".tmp", log)
    if dist.is_initialized():
        dist.barrier()


class MetricsLogger:
    """One JSON object per logged step appended to output_dir/metrics.jsonl (always), stdout, and wandb when a
    project is given (works with WANDB_MODE=offline). Only rank 0 writes. It deletes nothing: prepare_output_dir has
    readied the folder (a fresh log, or the rows up to the resumed step). resume_step: the wandb run continues."""

    def __init__(self, output_dir, args=None, wandb_project=None, run_name=None, quiet=False, resume_step=None):
        self.rank0, self.quiet, self.wandb = is_rank0(), quiet, None
        if self.rank0:
            os.makedirs(output_dir, exist_ok=True)
            self.f = open(os.path.join(output_dir, "metrics.jsonl"), "a")
            if args is not None:
                with open(os.path.join(output_dir, "args.json"), "w") as f:
                    json.dump(vars(args) if not isinstance(args, dict) else args, f, indent=2, default=str)
            if wandb_project:
                import wandb
                id_file = os.path.join(output_dir, "wandb_run_id")
                run_id = open(id_file).read().strip() if resume_step is not None and os.path.exists(id_file) else None
                self.wandb = wandb.init(project=wandb_project, name=run_name, dir=output_dir, id=run_id,
                                        resume="allow" if run_id else None,
                                        config=vars(args) if not isinstance(args, dict) else args)
                with open(id_file, "w") as f:
                    f.write(self.wandb.id)
        if dist.is_initialized():
            dist.barrier()  # no rank starts before the folder is ready

    def log(self, step, metrics, echo=True):
        if not self.rank0:
            return
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float, torch.Tensor)) and not isinstance(v, bool)
                                    else v) for k, v in metrics.items()}}
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        if echo and not self.quiet:
            from tqdm import tqdm
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def close(self):
        if self.rank0:
            self.f.close()
            if self.wandb is not None:
                self.wandb.finish()


class StepTimer:
    """Wall time of each step and of its phases, kept apart from metrics.jsonl (which is identical run to run):
    output_dir/timings.jsonl, one row per step {"step", "time/step", "time/<phase>", "tokens/<kind>"}, and a last
    row {"summary": true} with, per rank, the peak memory and the bytes of parameters + optimiser state the rank
    holds (FSDP2 shards them). `lap(name)` books the time since the previous lap (or step end) to a phase, so a
    script marks its blocks without re-indenting them. time/step runs from the previous step's end, so it covers
    everything. On CUDA each mark synchronises first: the times are the GPU's, not the launch queue's."""

    def __init__(self, output_dir, device, resume=False):
        self.device, self.phases, self.f = device, {}, None
        if is_rank0():
            self.f = open(os.path.join(output_dir, "timings.jsonl"), "a" if resume else "w")
        self.last = self.t = self._now()

    def _now(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, name):
        now = self._now()
        self.phases[f"time/{name}"] = self.phases.get(f"time/{name}", 0.0) + now - self.t
        self.t = now

    def step(self, step, **counts):
        now = self._now()
        if self.f:
            self.f.write(json.dumps({"step": step, "time/step": now - self.last, **self.phases, **counts}) + "\n")
            self.f.flush()
        self.phases, self.last, self.t = {}, now, now

    def close(self, trained):
        """Summary row; `trained`: {name: (model, optimizer or None)}. Collective: every rank calls it."""
        import resource
        local = 0
        for model, opt in trained.values():
            tensors = list(model.parameters())
            if opt is not None:
                tensors += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
            for t in tensors:
                t = t.to_local() if hasattr(t, "to_local") else t
                local += t.numel() * t.element_size()
        mine = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "param_optim_mb": local / 2 ** 20,
                "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if self.device.type == "cuda" else None}
        per_rank = gather_objects([mine])
        if self.f:
            self.f.write(json.dumps({"summary": True, **{k: [r[k] for r in per_rank] for k in mine}}) + "\n")
            self.f.close()


def progress(iterable=None, **kw):
    from tqdm import tqdm
    return tqdm(iterable, disable=not is_rank0(), dynamic_ncols=True, **kw)


# ----------------------------------------------------------------------------- the synthetic task's exact judge
TINY_TASK_DATA = os.path.join(HERE, "data", "tiny-safety")


def load_judge(name, data=""):
    """The exact rule-based judge of a synthetic task (`tiny_safety` -> data/tiny_safety.py: is_unsafe, helpful_score,
    report, group_items, ...), or None.
    name 'auto' (the stages' default): the tiny task's judge when every file of `data` (the stage's training or
    prompt data) is the tiny task's, else none: its rules mean nothing on other prompts."""
    if name == "auto":
        specs = [s.strip() for s in data.split(",") if s.strip()]
        tiny = bool(specs) and all(os.path.realpath(s).startswith(TINY_TASK_DATA + os.sep) for s in specs)
        name = "tiny_safety" if tiny else ""
    if not name:
        return None
    sys.path.insert(0, os.path.join(HERE, "data"))
    try:
        return __import__(name)
    except ImportError:
        raise UserError(f"unknown judge {name!r} (expected a module in data/, e.g. tiny_safety)") from None


# ----------------------------------------------------------------------------- resume checkpoints (DCP) and signals
CHECKPOINTS = "checkpoints"  # output_dir/checkpoints/step-00000012/ = one complete resume checkpoint


def checkpoint_dirs(output_dir):
    """Complete resume checkpoints of a run, oldest first. A checkpoint is written to a temp folder and renamed
    when every file is in it, so a step-XXXXXXXX folder is complete by construction."""
    pattern = os.path.join(output_dir, CHECKPOINTS, "step-[0-9]*")
    return sorted((d for d in glob.glob(pattern) if not d.endswith(".tmp")
                   and os.path.exists(os.path.join(d, "trainer_state.json"))), key=lambda d: int(d.rsplit("-", 1)[1]))


def resolve_resume(resume, output_dir):
    """--resume '' (off) | auto (newest checkpoint in output_dir, else a fresh start) | a checkpoint folder | a run
    folder (its newest checkpoint). -> checkpoint path or None."""
    if not resume:
        return None
    if resume == "auto":
        found = checkpoint_dirs(output_dir)
        if not found:
            print0(f"[resume] no checkpoint in {output_dir}/{CHECKPOINTS}: starting fresh")
        return found[-1] if found else None
    if os.path.exists(os.path.join(resume, "trainer_state.json")):
        return resume
    found = checkpoint_dirs(resume)
    if not found:
        raise UserError(f"--resume {resume}: not a checkpoint folder and holds no {CHECKPOINTS}/step-* checkpoint")
    return found[-1]


def _model_states(models):
    """{name: (model, optimizer or None)} -> DCP state dict: sharded (DTensor) model and optimiser states, so each
    rank writes its own shard and any number of ranks can read them back (DCP reshards on load)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    out = {}
    for name, (model, opt) in models.items():
        if opt is None:
            out[name] = {"model": get_model_state_dict(model)}
        else:
            msd, osd = get_state_dict(model, opt)
            out[name] = {"model": msd, "optim": osd}
    return out


def _rng_state(generators):
    """This rank's RNG streams as base64 text: the global torch (and CUDA) generators and the stage's own."""
    enc = lambda t: base64.b64encode(t.cpu().numpy().tobytes()).decode()  # noqa: E731
    out = {"torch": enc(torch.get_rng_state()), **{k: enc(g.get_state()) for k, g in generators.items()}}
    if torch.cuda.is_available():
        out["cuda"] = enc(torch.cuda.get_rng_state())
    return out


def _set_rng_state(state, generators):
    import numpy as np
    dec = lambda s: torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())  # noqa: E731
    torch.set_rng_state(dec(state["torch"]))
    for k, g in generators.items():
        g.set_state(dec(state[k]))
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(dec(state["cuda"]))


def save_checkpoint(output_dir, step, models, state, generators=None, keep_last=2):
    """A resume checkpoint of optimiser step `step`, written by all ranks with torch.distributed.checkpoint:
    models and optimisers sharded (`models`: {name: (model, optimizer or None)}), plus trainer_state.json from
    rank 0: the stage's JSON `state` (step, scheduler, λ, ...) and the RNG states of every rank. Written to
    step-N.tmp and renamed, so a kill at any moment leaves only complete checkpoints; then all but the newest
    keep_last are deleted."""
    import shutil
    import torch.distributed.checkpoint as dcp
    root = os.path.join(output_dir, CHECKPOINTS)
    final = os.path.join(root, f"step-{step:08d}")
    tmp = final + ".tmp"
    if os.path.exists(final):
        return final
    if is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        os.makedirs(tmp)
    dist.barrier()
    dcp.save(_model_states(models), storage_writer=dcp.FileSystemWriter(tmp))
    rng = gather_objects([_rng_state(generators or {})])
    if is_rank0():
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({**state, "step": step, "world_size": dist.get_world_size(), "rng": rng}, f)
        os.replace(tmp, final)
        stale = glob.glob(os.path.join(root, "step-*.tmp"))  # half-written by a killed run
        for old in stale + (checkpoint_dirs(output_dir)[:-keep_last] if keep_last > 0 else []):
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata file is a pickle, and pickle.load runs whatever a crafted file asks for. This unpickler
    resolves only the classes a DCP metadata file is made of (DCP's own metadata records, torch.Size, dtypes,
    paths); any other global, e.g. os.system in a planted payload, is an error before anything runs."""
    ALLOWED = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
               ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
               ("collections", "OrderedDict")}

    def __init__(self, f, source):
        super().__init__(f)
        self.source = source

    def find_class(self, module, name):
        if not (module == "torch.distributed.checkpoint.metadata" or (module, name) in self.ALLOWED
                or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))):
            raise UserError(f"{self.source}: refusing to load {module}.{name} from a checkpoint's metadata (not a "
                            f"DCP metadata class: the file may have been tampered with)")
        return super().find_class(module, name)


def _safe_reader(path, md):
    """A DCP reader that hands DCP the metadata `md` we unpickled safely, instead of pickle.load-ing the file."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *a, **k):  # tensors themselves are read with torch.load(weights_only=True) by DCP
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md
    return SafeReader(path)


def checkpoint_state(path, expect=None):
    """trainer_state.json of a checkpoint (JSON: nothing in it can execute). `expect`: {key: value} this run needs
    to match (stage, global batch, ...), checked before any weights are read."""
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable trainer_state.json ({e})") from None
    for k, v in (expect or {}).items():
        if k in ADDED_LATER and k not in state:
            continue  # a checkpoint written before the key existed resumes as it did then
        if state.get(k) != v:
            raise UserError(f"{path}: checkpoint has {k}={state.get(k)!r} but this run has {v!r}" +
                            ("; set --global_batch_size (or --rollout_batch_size) to the checkpoint's to resume on "
                             "another number of ranks" if "batch" in k else "") +
                            ("; the learning-rate schedule (warmup + cosine) is laid out over the whole run: resume "
                             "with the checkpoint's --max_steps / --epochs, or start a new run" if k == "total_steps"
                             else "") +
                            ("; a resumed run keeps its objective: pass the checkpoint's value, or start a new run "
                             "(e.g. from the saved policy)" if k in OBJECTIVE_KEYS else ""))
    return state


OBJECTIVE_KEYS = ("kl_coeff", "thresholds", "lambda_lr", "shaping_coeff")  # PPO's objective (ppo_lagrangian.run_identity)
ADDED_LATER = ("total_steps",) + OBJECTIVE_KEYS  # run-state keys older checkpoints lack (2026-12-04)


def load_checkpoint(path, models, generators=None):
    """Restore `models` ({name: (model, optimizer or None)}, built as for a fresh run) in place from a checkpoint
    written with any number of ranks; restore this rank's RNG streams when the world size is the same.
    -> the stage's JSON state (step, scheduler, ...)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict
    state = checkpoint_state(path)
    source = os.path.join(path, ".metadata")
    try:  # read the metadata here, where a refusal is one clear line (inside dcp.load it would be wrapped)
        with open(source, "rb") as f:
            md = _MetadataUnpickler(f, source).load()
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise UserError(f"{source}: unreadable checkpoint metadata ({e})") from None
    sd = _model_states(models)
    try:
        dcp.load(sd, storage_reader=_safe_reader(path, md))
    except Exception as e:  # a checkpoint of another stage/model: DCP names the missing keys
        msg = str(e).strip().splitlines()
        raise UserError(f"{path}: does not match this run's models ({msg[-1][:300] if msg else type(e).__name__})") from None
    for name, (model, opt) in models.items():
        if opt is None:
            set_model_state_dict(model, sd[name]["model"])
        else:
            set_state_dict(model, opt, model_state_dict=sd[name]["model"], optim_state_dict=sd[name]["optim"])
    world, rank = dist.get_world_size(), dist.get_rank()
    if state["world_size"] == world:
        _set_rng_state(state["rng"][rank], generators or {})
    else:  # the sampling streams cannot map from N ranks to M: reseed from (seed, step, rank), and say so
        torch.manual_seed(state.get("seed", 0) * 1000 + state["step"] * 10 + rank)
        for k, g in (generators or {}).items():
            g.manual_seed(state.get("seed", 0) * 1000 + state["step"] * 10 + rank + 7919 * (1 + list(generators).index(k)))
        print0(f"[resume] checkpoint written by {state['world_size']} ranks, resuming on {world}: weights, optimiser "
               f"and schedule are exact; random streams are reseeded")
    print0(f"[resume] continuing from {path} (step {state['step']})")
    return state


class StopOnSignal:
    """SIGTERM (what a cluster scheduler sends before killing a job) sets a flag instead of killing the process;
    the training loop asks `requested()` once per step, which agrees across ranks, and then writes a resume
    checkpoint and exits with status 143 (128 + SIGTERM, so `set -e` pipelines stop)."""

    def __init__(self):
        import signal
        self.flag = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        self.flag = True

    def requested(self):
        return all_reduce(float(self.flag), "max") > 0

    def release(self):
        """Call after the step loop, once the model is saved. A SIGTERM that came during the last step or the save
        exits now (143); from here on SIGTERM ends the process at once (the default action): what is left is
        evaluation, which writes nothing a rerun needs, so a scheduler's SIGTERM is never ignored. Collective."""
        import signal
        if self.requested():
            print0("[resume] SIGTERM: the trained model is saved; exiting before the final evaluation")
            cleanup_distributed()
            sys.exit(143)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    @staticmethod
    def exit(checkpoint):
        print0(f"[resume] SIGTERM: saved {checkpoint}; continue with --resume")
        cleanup_distributed()
        sys.exit(143)
