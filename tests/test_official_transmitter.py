"""Official transmitter layout: exact TSV keys/shapes at release size (meta device), strict loading, bit-exact
round trips and numeric equivalence at tiny size."""

import inspect
import math
import os
import pickle
import shlex

import pytest
import torch
import yaml

from shapee.encoder import ChannelsEncoder
from shapee.implicit import NeRSTFMLP
from shapee.io.official import (
    OfficialCheckpointError,
    TransmitterModules,
    build_transmitter_modules,
    load_official,
    official_transmitter_keys,
    read_state_dict_tsv,
    save_official_transmitter,
    to_official_state_dict,
    transmitter_modules_from_state_dict,
)

REFERENCE = "/work/shared/reference"
TSV = f"{REFERENCE}/transmitter_state_dict.tsv"
CONFIG = f"{REFERENCE}/official_configs/transmitter_config.yaml"

TINY = dict(
    encoder_kwargs=dict(
        width=32, heads=2, layers=3, data_ctx=16, d_latent=16, n_points=256, n_views=2, pointconv_samples=16,
        pointconv_hidden=(32, 32), image_size=32,
    ),
    mlp_kwargs=dict(d_hidden=8),
)


def random_official_state_dict(seed=0, **build_kwargs):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) for k, shape in official_transmitter_keys(**build_kwargs).items()}


# ------------------------------------------------------------------------------------------------ release layout
def test_keys_and_shapes_equal_reference_tsv():
    ours = official_transmitter_keys()
    reference = read_state_dict_tsv(TSV)
    assert len(reference) == 213
    assert set(ours) == set(reference)
    assert {k: v for k, v in ours.items() if reference[k] != v} == {}
    assert sum(math.prod(s) for s in ours.values()) / 1e6 == pytest.approx(444.0, abs=0.05)  # reference §1.7


def test_defaults_equal_official_config():
    cfg = yaml.safe_load(open(CONFIG))
    enc, mlp = cfg["encoder"], cfg["renderer"]["nerstf"]
    defaults = {k: p.default for k, p in inspect.signature(ChannelsEncoder).parameters.items()}
    for key in ("width", "heads", "layers", "init_scale", "data_ctx", "d_latent", "input_channels", "max_depth", "patch_size"):
        assert defaults[key] == enc[key], key
    assert defaults["pointconv_samples"] == enc["pointconv_samples"]
    assert list(defaults["pointconv_hidden"]) == enc["pointconv_hidden"]
    assert defaults["pointconv_patch_size"] == enc["pointconv_patch_size"]
    assert defaults["pointconv_stride"] == enc["pointconv_stride"]
    assert [defaults["n_points"], defaults["n_views"]] == enc["inner_batch_size"]
    bn = enc["latent_bottleneck"]
    assert defaults["bottleneck_prob"] == bn["diffusion_prob"]
    assert defaults["bottleneck_timesteps"] == bn["diffusion"]["timesteps"]
    assert defaults["bottleneck_power"] == bn["diffusion"]["schedule_args"]["power"]
    mdefaults = {k: p.default for k, p in inspect.signature(NeRSTFMLP).parameters.items()}
    for key in ("d_hidden", "n_hidden_layers", "n_meta_layers", "insert_direction_at", "init_scale"):
        assert mdefaults[key] == mlp[key], key
    assert mdefaults["initial_density_bias"] == mlp["initial_density_bias"]


# ------------------------------------------------------------------------------------------------ strict loading
def test_strict_load_and_bit_exact_round_trip(tmp_path):
    sd = random_official_state_dict(**TINY)
    modules = transmitter_modules_from_state_dict(sd, **TINY)
    assert isinstance(modules, TransmitterModules)
    assert all(p.requires_grad for p in modules.parameters())
    assert not any(t.is_meta for t in modules.state_dict().values())
    back = to_official_state_dict(modules)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    # meta weights land in the MLP buffers, params_proj keys move out of "encoder."
    assert torch.equal(modules.nerstf.mlp[1].weight, sd["renderer.nerstf.mlp.1.weight"])
    assert torch.equal(
        modules.params_proj.projections["nerstf__mlp__0__weight"].norm.weight,
        sd["encoder.params_proj.projections.nerstf__mlp__0__weight.norm.weight"],
    )
    # through a file (torch.save / weights_only load) and through safetensors
    path = tmp_path / "transmitter.pt"
    save_official_transmitter(modules, path)
    again = load_official("transmitter", path, **TINY)
    assert all(torch.equal(v, sd[k]) for k, v in to_official_state_dict(again).items())
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "t.safetensors"))
    st = load_official("transmitter", tmp_path / "t.safetensors", **TINY)
    assert all(torch.equal(v, sd[k]) for k, v in to_official_state_dict(st).items())


def test_loaded_modules_compute_the_same_latent_and_field():
    torch.manual_seed(0)
    src = build_transmitter_modules(**TINY).eval()
    loaded = transmitter_modules_from_state_dict(to_official_state_dict(src), **TINY).eval()
    from test_encoder import tiny_batch

    batch = tiny_batch()
    with torch.no_grad():
        a = src.encoder(batch, generator=torch.Generator().manual_seed(0))
        b = loaded.encoder(batch, generator=torch.Generator().manual_seed(0))
        assert torch.equal(a, b)
        pts = torch.rand(2, 9, 3) * 2 - 1
        fa = src.nerstf(src.params_proj(a), pts)
        fb = loaded.nerstf(loaded.params_proj(b), pts)
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    assert fa["sdf"].shape == (2, 9)


def test_strict_load_errors_name_the_keys():
    sd = random_official_state_dict(**TINY)
    bad = dict(sd)
    del bad["encoder.ln_pre.weight"]
    bad["encoder.pos_emb"] = torch.zeros(3)
    bad["encoder.output_proj.weight"] = torch.zeros(5, 5)
    with pytest.raises(OfficialCheckpointError) as err:
        transmitter_modules_from_state_dict(bad, **TINY)
    msg = str(err.value)
    assert "1 missing" in msg and "encoder.ln_pre.weight" in msg
    assert "1 unexpected" in msg and "encoder.pos_emb" in msg
    assert "encoder.output_proj.weight: checkpoint (5, 5) vs model (16, 32)" in msg
    # release-size modules reject a tiny checkpoint without allocating anything
    with pytest.raises(OfficialCheckpointError, match="shape mismatch"):
        transmitter_modules_from_state_dict(sd)


def test_load_official_rejects_unknown_names_and_pickled_code(tmp_path):
    with pytest.raises(ValueError, match="supported: .*transmitter"):
        load_official("decoder", {})
    with pytest.raises(FileNotFoundError):
        load_official("transmitter", tmp_path / "missing.pt")
    path = tmp_path / "evil.pt"
    torch.save({"x": NotATensor()}, path)
    with pytest.raises(OfficialCheckpointError, match=r"evil\.pt.*weights-only.*pickled objects other than tensors"):
        load_official("transmitter", path, **TINY)


class NotATensor:
    pass


class _RunsAShellCommand:
    """Unpickling this calls ``os.system(command)``: what a malicious checkpoint would carry."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("name", ["transmitter", "text300M", "image300M", "pointe_sdf"])
@pytest.mark.parametrize("container", ["torch_zip", "plain_pickle"])
def test_official_readers_refuse_code_without_running_it(tmp_path, name, container):
    import shapee.io.official_pointe  # noqa: F401  (registers "pointe_sdf")
    import shapee.io.official_priors  # noqa: F401  (registers the priors)

    marker = tmp_path / "pwned"
    payload = {"encoder.ln_pre.weight": torch.zeros(2), "x": _RunsAShellCommand(f"touch {shlex.quote(str(marker))}")}
    path = tmp_path / "model.pt"
    if container == "torch_zip":
        torch.save(payload, path)
    else:  # the legacy (non-zip) torch format: a bare pickle stream
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(OfficialCheckpointError, match=r"model\.pt.*refused, never executed"):
        load_official(name, path)
    assert not marker.exists(), "torch.load ran code from the checkpoint"
    # The payload is live: a plain unpickler does run it (so the assertion above could fail).
    pickle.loads(pickle.dumps(payload["x"]))
    assert marker.exists()


@pytest.mark.parametrize("name", ["transmitter", "text300M", "pointe_sdf"])
def test_official_readers_name_the_file_for_garbage_and_truncated_files(tmp_path, name):
    import shapee.io.official_pointe  # noqa: F401
    import shapee.io.official_priors  # noqa: F401

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint \x00\xff" * 10)
    with pytest.raises(OfficialCheckpointError, match=r"garbage\.pt.*cannot be read as a weights-only state dict"):
        load_official(name, garbage)
    good = tmp_path / "good.pt"
    torch.save({"a": torch.zeros(1000)}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(OfficialCheckpointError, match=r"truncated\.pt.*cannot be read"):
        load_official(name, truncated)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(OfficialCheckpointError, match=r"bad\.safetensors.*corrupt, truncated or not a safetensors"):
        load_official(name, bad_st)
    not_a_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(OfficialCheckpointError, match=r"list\.pt.*does not hold a state dict \(got list\)"):
        load_official(name, not_a_dict)
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_official(name, tmp_path / "absent.pt")


def test_dtype_and_device_on_load():
    sd = {k: v.half() for k, v in random_official_state_dict(**TINY).items()}
    modules = transmitter_modules_from_state_dict(sd, device="cpu", **TINY)
    assert all(p.dtype == torch.float32 for p in modules.parameters())
    kept = transmitter_modules_from_state_dict(sd, dtype=None, **TINY)
    assert all(p.dtype == torch.float16 for p in kept.parameters())


def test_sizes_inferred_from_the_release_layout_are_the_released_defaults():
    # load_official reads sizes from the weights' shapes; at the release layout they must be exactly the defaults.
    from shapee.io.official_sizes import prior_sizes, transmitter_sizes

    release = {k: torch.empty(shape, device="meta") for k, shape in read_state_dict_tsv(TSV).items()}
    inferred = transmitter_sizes(release)
    assert official_transmitter_keys(**inferred) == read_state_dict_tsv(TSV)
    assert inferred["encoder_kwargs"]["width"] == 1024 and inferred["mlp_kwargs"]["d_hidden"] == 256
    for name in ("text", "image"):
        prior = {k: torch.empty(s, device="meta") for k, s in read_state_dict_tsv(f"{REFERENCE}/{name}_cond_state_dict.tsv").items()}
        sizes = prior_sizes(prior)
        assert (sizes["width"], sizes["layers"], sizes["n_ctx"], sizes["d_latent"]) == (1024, 24, 1024, 1024)
        assert sizes["cond_dim"] == (768 if name == "text" else 1024)


def test_load_official_infers_a_resized_transmitter_without_size_kwargs():
    state = random_official_state_dict(**TINY)
    model = load_official("transmitter", state)  # no sizes passed
    assert model.encoder.width == 32 and model.nerstf.mlp[0].weight.shape[0] == 8
    assert all(torch.equal(v, state[k]) for k, v in to_official_state_dict(model).items())
