"""Weight transport: file format/validation units, and real syncs into a real vLLM CPU engine.

The engine tests share one engine (module fixture, ~30 s to start) and check against the HF model in fp32:
before a sync the engine's logprobs of a fixed completion differ from the updated learner weights, after it they
match within 1e-4, and bad weights are refused with a clear error while the engine keeps working.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cluster.transports import make_transport
from cluster.weight_sync import (
    ShmSafetensorsTransport,
    WeightHandle,
    checkpoint_params,
    file_checksum,
    optional_param_names,
    read_safetensors_header,
    state_dict_checksum,
    validate_params,
)


def _sd(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {"model.embed_tokens.weight": torch.randn(7, 4, generator=g),
            "model.norm.weight": torch.randn(4, generator=g).to(torch.bfloat16),
            "lm_head.weight": torch.randn(7, 4, generator=g)}


# ------------------------------------------------------------------------------------------------ units
def test_publish_writes_atomic_step_dirs_and_cleans_up(tmp_path):
    tr = ShmSafetensorsTransport(root=str(tmp_path), run_name="run", keep_last=2)
    handles = [tr.publish(_sd(s), step=s) for s in (1, 2, 3)]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["step_00000002", "step_00000003"]
    h = handles[-1]
    assert h.step == 3 and h.kind == "shm_safetensors" and Path(h.location) == tr.step_dir(3)
    assert h.tensors["model.norm.weight"] == ((4,), "BF16")
    header = read_safetensors_header(Path(h.location) / "model.safetensors")
    assert {k: tuple(v["shape"]) for k, v in header.items()} == h.shapes
    assert file_checksum(Path(h.location) / "model.safetensors") == h.checksum
    assert tr.check(h, expected_params=h.shapes) == Path(h.location)
    with pytest.raises(FileNotFoundError, match="step 1 not found"):
        tr.check(handles[0])
    (tmp_path / "other_run").mkdir()
    tr.cleanup(keep_last=0)
    assert not (tmp_path / "run").exists() and (tmp_path / "other_run").exists()


def test_republishing_a_step_replaces_it(tmp_path):
    tr = ShmSafetensorsTransport(root=str(tmp_path), run_name="r")
    h1 = tr.publish(_sd(0), step=5)
    h2 = tr.publish(_sd(1), step=5)
    assert h1.checksum != h2.checksum
    assert file_checksum(Path(h2.location) / "model.safetensors") == h2.checksum
    with pytest.raises(ValueError, match="checksum"):
        tr.check(h1)  # the old handle now points at other content


def test_checksum_detects_changed_content(tmp_path):
    from safetensors.torch import save_file

    tr = ShmSafetensorsTransport(root=str(tmp_path), run_name="r")
    sd = _sd(0)
    h = tr.publish(sd, step=1)
    sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"] + 1e-3
    save_file({k: v.contiguous() for k, v in sd.items()}, str(Path(h.location) / "model.safetensors"))
    assert state_dict_checksum(sd) != h.checksum
    with pytest.raises(ValueError, match="does not hold the tensors published for step 1"):
        tr.check(h)
    assert ShmSafetensorsTransport(root=str(tmp_path), run_name="r", verify_checksum=False).check(h)


def test_header_and_checksum_offsets_match_the_files_own_header(tmp_path):
    import struct

    from safetensors.torch import save_file

    sd = {**_sd(1), "empty": torch.ones(0), "ids": torch.arange(5), "mask": torch.tensor([True, False, True])}
    f = tmp_path / "model.safetensors"
    save_file(sd, str(f), metadata={"format": "pt"})
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])  # the format's own header, as the reference for the offsets
    own = json.loads(raw[8:8 + n])
    own.pop("__metadata__")
    assert read_safetensors_header(f) == own
    assert file_checksum(f) == state_dict_checksum(sd)
    (tmp_path / "cut.safetensors").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="cut.safetensors: not a valid safetensors file"):
        file_checksum(tmp_path / "cut.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        read_safetensors_header(tmp_path / "nope.safetensors")


def test_tied_weights_are_published_once(tmp_path):
    emb = torch.randn(7, 4)
    sd = {"model.embed_tokens.weight": emb, "lm_head.weight": emb, "model.norm.weight": torch.ones(4)}
    h = ShmSafetensorsTransport(root=str(tmp_path), run_name="r").publish(sd, step=0)
    assert set(h.tensors) == {"model.embed_tokens.weight", "model.norm.weight"}


def test_validate_params_names_every_problem():
    expected = {"a": (2, 3), "b": (4,), "c": (1,), "lm_head.weight": (5, 2)}
    with pytest.raises(ValueError) as e:
        validate_params({"a": (3, 2), "b": (4,), "zzz": (1,)}, expected, optional={"lm_head.weight"})
    msg = str(e.value)
    assert "1 missing: c" in msg and "1 unexpected: zzz" in msg and "a [3, 2] (expected [2, 3])" in msg
    assert "lm_head" not in msg
    validate_params({"a": [2, 3], "b": [4], "c": [1]}, expected, optional={"lm_head.weight"})


def test_bad_inputs_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown weight transport 'nccl'"):
        make_transport("nccl")
    with pytest.raises(ValueError, match="does not take \\['bogus'\\]"):
        make_transport("shm_safetensors", root=str(tmp_path), bogus=1)
    with pytest.raises(ValueError, match="run_name"):
        ShmSafetensorsTransport(root=str(tmp_path), run_name="../x")
    tr = ShmSafetensorsTransport(root=str(tmp_path), run_name="r")
    with pytest.raises(ValueError, match="empty"):
        tr.publish({}, step=1)
    with pytest.raises(TypeError, match="'w' is a list"):
        tr.publish({"w": [1.0]}, step=1)
    h = tr.publish(_sd(), step=1)
    with pytest.raises(ValueError, match="published by transport 'collective'"):
        tr.check(WeightHandle(**{**h.__dict__, "kind": "collective"}))
    with pytest.raises(ValueError, match=r"'collective' needs \['device'\]"):
        make_transport("collective")


def test_collective_transport_backend_comes_from_the_device_table():
    import pickle

    for device, backend in (("cpu", "gloo"), ("cuda", "nccl"), ("npu", "hccl")):
        tr = make_transport("collective", device=device, root="/dev/shm/ignored", run_name="x")
        assert tr.backend == backend
        assert tr.engine_kwargs(device) == {"worker_extension_cls": "cluster.collective.WeightReceiverExtension"}
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        make_transport("collective", device="tpu")
    tr = make_transport("collective", device="cpu", bucket_mb=1)
    tr.serve(receivers=3)
    copy = pickle.loads(pickle.dumps(tr))  # what an actor gets: the rendezvous, not the driver's store
    assert copy.rendezvous == tr.rendezvous and copy.rendezvous["world_size"] == 4
    assert copy._server is None and tr._server is not None
    assert tr.serve(receivers=3) == tr.rendezvous  # same size: the same group
    group = tr.rendezvous["group"]
    tr.reset()
    assert tr.serve(receivers=3)["group"] != group  # re-formed under a new id
    tr.close()


def test_checkpoint_params_of_tiny_model(tmp_path):
    from passk_rl.models.tiny import build_random_model

    path = build_random_model(tmp_path / "m", seed=0)
    params = checkpoint_params(path)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path)
    assert params == {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert optional_param_names(path) == frozenset()  # the tiny model does not tie embeddings
    cfg = json.loads((path / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (path / "config.json").write_text(json.dumps(cfg))
    assert optional_param_names(path) == frozenset({"lm_head.weight"})


# ---------------------------------------------------------------------------------- real vLLM engine
# Longer than one KV-cache block (128 tokens on CPU), so its first block lands in the prefix cache.
PROMPT = ("The quick brown fox jumps over the lazy dog; then it runs far away. " * 3)[:170]
COMPLETION = " and sleeps."


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.generator import VLLMGenerator
    from passk_rl.models.tiny import build_random_model

    tmp = tmp_path_factory.mktemp("ws")
    path = build_random_model(tmp / "model", seed=0)
    tr = ShmSafetensorsTransport(root="/dev/shm/passk_rl_test", run_name=f"ws_{os.getpid()}")
    gen = VLLMGenerator(str(path), seed=0, transport=tr, kv_cache_bytes=64 * 2**20, max_model_len=256)
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    yield dict(gen=gen, hf=hf, tok=tok, tr=tr, path=path)
    gen.shutdown()
    tr.cleanup(keep_last=0)


def hf_logprobs(hf, prompt_ids, completion_ids):
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logp = torch.log_softmax(hf(ids).logits[0].float(), dim=-1)
    pos = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(completion_ids) - 1)
    return logp[pos, torch.tensor(completion_ids)].tolist()


def _perturb(hf, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_weight_sync_is_real(env):
    gen, hf, tok, tr = env["gen"], env["hf"], env["tok"], env["tr"]
    p_ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    c_ids = tok(COMPLETION, add_special_tokens=False)["input_ids"]
    before_engine = torch.tensor(gen.score([p_ids], [c_ids])[0])
    assert torch.allclose(before_engine, torch.tensor(hf_logprobs(hf, p_ids, c_ids)), atol=1e-4)
    # Generation: n samples with one logprob per token, equal to the HF model's; the seed reproduces them. This
    # also puts the prompt's first KV block into the prefix cache, computed with the old weights.
    out = gen.generate([PROMPT, "12+7="], n=3, max_tokens=6, seed=1)
    assert [len(g) for g in out] == [3, 3]
    for g in out:
        for s in g:
            assert len(s.logprobs) == len(s.token_ids) >= 1
            assert (torch.tensor(s.logprobs) - torch.tensor(hf_logprobs(hf, s.prompt_token_ids, s.token_ids))
                    ).abs().max() < 1e-4
    again = gen.generate([PROMPT, "12+7="], n=3, max_tokens=6, seed=1)
    assert [[s.token_ids for s in g] for g in again] == [[s.token_ids for s in g] for g in out]

    _perturb(hf, seed=1)  # the "learner" takes a step
    want = torch.tensor(hf_logprobs(hf, p_ids, c_ids))
    assert (before_engine - want).abs().max() > 1e-2, "perturbation too small to tell the weights apart"
    handle = tr.publish(hf.state_dict(), step=1)
    assert torch.allclose(torch.tensor(gen.score([p_ids], [c_ids])[0]), before_engine, atol=1e-6)  # not yet synced
    report = gen.sync_weights(handle)
    assert report["step"] == 1 and gen.weights_step == 1
    after = torch.tensor(gen.score([p_ids], [c_ids])[0])
    assert (after - want).abs().max().item() < 1e-4
    # Generation after the sync uses the new weights even for a prompt whose prefix was cached before it.
    s = gen.generate([PROMPT], n=2, max_tokens=8, seed=2)[0][0]
    stale = (torch.tensor(s.logprobs) - torch.tensor(hf_logprobs(hf, p_ids, s.token_ids))).abs().max().item()
    assert stale < 1e-4, f"generation after sync disagrees with the new weights by {stale:.3g} (stale prefix cache?)"

    # A second step: the engine follows again, and old versions are cleaned up.
    _perturb(hf, seed=2)
    gen.sync_weights(tr.publish(hf.state_dict(), step=2))
    gen.sync_weights(tr.publish(hf.state_dict(), step=3))
    assert sorted(p.name for p in tr.run_dir.iterdir()) == ["step_00000002", "step_00000003"]
    after3 = torch.tensor(gen.score([p_ids], [c_ids])[0])
    assert (after3 - torch.tensor(hf_logprobs(hf, p_ids, c_ids))).abs().max().item() < 1e-4


def test_bad_weights_are_refused_and_engine_keeps_working(env):
    gen, hf, tok, tr = env["gen"], env["hf"], env["tok"], env["tr"]
    p_ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    c_ids = tok(COMPLETION, add_special_tokens=False)["input_ids"]
    before = gen.score([p_ids], [c_ids])[0]
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 5)
    sd["model.layers.9.self_attn.q_proj.weight"] = sd.pop("model.layers.1.self_attn.q_proj.weight")
    handle = tr.publish(sd, step=10)
    with pytest.raises(ValueError) as e:
        gen.sync_weights(handle)
    msg = str(e.value)
    assert "model.layers.1.self_attn.q_proj.weight" in msg  # missing
    assert "model.layers.9.self_attn.q_proj.weight" in msg  # unexpected
    assert "model.layers.0.mlp.up_proj.weight [3, 5]" in msg  # wrong shape
    assert torch.allclose(torch.tensor(gen.score([p_ids], [c_ids])[0]), torch.tensor(before), atol=1e-6)  # unchanged
    assert len(gen.generate([PROMPT], n=1, max_tokens=4, seed=0)[0][0].token_ids) > 0
