"""Inventory: what-if specs, Slurm node lists and env, DeepSpeed hostfiles, NVML (faked) and its absence."""
from __future__ import annotations

import sys
import types

import pytest

from launcher import inventory as inv
from launcher.errors import UserError
from launcher.inventory import GiB, detect_inventory, parse_hostfile, parse_spec
from launcher.nodelist import expand_nodelist


@pytest.mark.parametrize("spec,nodes,gpus,name,mem_mib,cc", [  # MiB: what the card reports (nvidia-smi)
    ("1xRTX3090-24GB", 1, 1, "RTX3090", 24576, (8, 6)),
    ("8xA100-40GB", 1, 8, "A100", 40960, (8, 0)),
    ("4x8xH100-80GB", 4, 8, "H100", 81559, (9, 0)),
    ("2xA100", 1, 2, "A100", 81920, (8, 0)),  # memory optional for well-known names: A100 defaults to 80
    ("1xrtx4090", 1, 1, "RTX4090", 24564, (8, 9)),
    ("1xH200", 1, 1, "H200", 143771, (9, 0)),
    ("8xV100-16GB", 1, 8, "V100", 16160, (7, 0)),
    ("1xT4", 1, 1, "T4", 15360, (7, 5)),
    ("2xL40S", 1, 2, "L40S", 46068, (8, 9)),
    ("1xA6000", 1, 1, "A6000", 49140, (8, 6)),
    ("2X4XL4-24gb", 2, 4, "L4", 23034, (8, 9)),
    ("1xMI300X-192GB", 1, 1, "MI300X", 192 * 1024, (9, 4)),  # no reported size on file: the label, as GiB
    ("1xH100-94GB", 1, 1, "H100", 94 * 1024, (9, 0)),  # a size the catalogue does not sell: as given, in GiB
])
def test_parse_spec(spec, nodes, gpus, name, mem_mib, cc):
    """A what-if plans with the memory the live card would report, not the GB it is sold as."""
    result = parse_spec(spec)
    assert (result.nodes, result.ranks_per_node, result.gpu.name) == (nodes, gpus, name)
    assert result.gpu.total_bytes == mem_mib * 2 ** 20
    assert tuple(result.gpu.compute_capability) == cc
    assert result.device == "cuda" and result.world_size == nodes * gpus and result.source == "spec"
    assert result.host_ram_bytes >= 64 * GiB and result.host_ram_assumed


def test_parse_spec_unknown_gpu_with_memory():
    result = parse_spec("2xB300X-288GB")
    assert result.gpu.total_bytes == 288 * GiB and result.gpu.supports_bf16
    assert any("not in the catalogue" in note for note in result.notes)


@pytest.mark.parametrize("spec,ranks", [("cpu", 1), ("2xcpu", 2), ("4xCPU", 4)])
def test_parse_cpu_spec(spec, ranks):
    result = parse_spec(spec, host_ram_bytes=64 * GiB)
    assert result.device == "cpu" and result.gpu is None
    assert result.world_size == ranks
    assert result.capacity_per_rank == 64 * GiB // ranks


@pytest.mark.parametrize("spec", ["", "RTX3090", "x", "0xA100", "1x0xA100", "1xA100-0GB", "2x2x2xA100", "cpu-16GB",
                                  "1xA100-abc", "1x", "8 A100", "1xcpu-2", "3x2xcpu"])
def test_parse_spec_bad(spec):
    with pytest.raises(UserError) as err:
        parse_spec(spec)
    assert str(err.value) == f"inventory spec '{spec}': expected [NODES x] GPUS x NAME[-MEM], e.g. 1xRTX3090-24GB"


@pytest.mark.parametrize("spec,expected", [
    ("1xA100-99999999999GB", "99999999999 GB per GPU is out of range; give 1-1024 GB"),
    ("1xH100-0.0000001GB", "0.0000001 GB per GPU is out of range"),
    ("99999999999x8xH100-80GB", "99999999999 node(s) x 8 GPU(s) is out of range"),
    ("1x65xH100", "1 node(s) x 65 GPU(s) is out of range"),
    ("5000xcpu", "5000 CPU ranks on one host; give at most 1024"),
])
def test_parse_spec_absurd_sizes(spec, expected):
    """Well-formed but beyond any machine: a typo, refused rather than planned (and overflowing the arithmetic)."""
    with pytest.raises(UserError) as err:
        parse_spec(spec)
    assert str(err.value).startswith(f"inventory spec '{spec}': {expected}"), str(err.value)


def test_empty_spec_is_refused_not_probed(monkeypatch):
    monkeypatch.setattr(inv, "probe_gpus", lambda env=None: pytest.fail("an empty spec must not probe"))
    with pytest.raises(UserError, match="--inventory: empty"):
        detect_inventory("", env={})


def test_parse_spec_unknown_gpu_without_memory():
    with pytest.raises(UserError, match="unknown GPU 'FOO9000'"):
        parse_spec("1xFOO9000")


@pytest.mark.parametrize("nodelist,hosts", [
    ("n[1-3,5],gpu01", ["n1", "n2", "n3", "n5", "gpu01"]),
    ("node[01-03]", ["node01", "node02", "node03"]),
    ("a,b", ["a", "b"]),
    ("single", ["single"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("gpu[009-011],cpu[1]", ["gpu009", "gpu010", "gpu011", "cpu1"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["n[1-3", "n[3-1]", "n[a-b]"])
def test_expand_nodelist_bad(nodelist):
    with pytest.raises(UserError):
        expand_nodelist(nodelist)


def test_parse_hostfile():
    text = "# cluster\nworker-1 slots=8\n\nworker-2 slots=8  # second\n"
    assert parse_hostfile(text) == [("worker-1", 8), ("worker-2", 8)]
    with pytest.raises(UserError, match="line 1"):
        parse_hostfile("worker-1 8")
    with pytest.raises(UserError, match="no 'HOST slots=N'"):
        parse_hostfile("# empty\n")
    with pytest.raises(UserError, match="hostfile line 3: host 'worker-1' is already on line 1; list each host once"):
        parse_hostfile("worker-1 slots=4\nworker-2 slots=4\nworker-1 slots=4\n")


def fake_gpus(n=4, name="NVIDIA A100-SXM4-80GB", total=80 * GiB, free=79 * GiB, cc=(8, 0)):
    return [inv.GpuInfo(name, total, free, cc) for _ in range(n)]


def test_nvml_absent_means_cpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    assert inv.probe_gpus({}) == []
    result = detect_inventory(env={})
    assert (result.source, result.device, result.world_size) == ("cpu", "cpu", 1)
    assert result.host_ram_bytes and result.cpu_count >= 1
    two = detect_inventory(env={"WORLD_SIZE": "2"})
    assert (two.device, two.world_size) == ("cpu", 2)


def test_probe_gpus_with_fake_nvml(monkeypatch):
    memory = types.SimpleNamespace(total=24 * GiB, free=20 * GiB)
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetName=lambda h: b"NVIDIA GeForce RTX 3090",
        nvmlDeviceGetMemoryInfo=lambda h: memory, nvmlDeviceGetCudaComputeCapability=lambda h: (8, 6))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    gpus = inv.probe_gpus({})
    assert len(gpus) == 2 and gpus[0].name == "NVIDIA GeForce RTX 3090" and gpus[0].free_bytes == 20 * GiB
    assert len(inv.probe_gpus({"CUDA_VISIBLE_DEVICES": "1"})) == 1
    result = detect_inventory(env={})
    assert (result.source, result.world_size, result.gpu.model.tflops16) == ("nvml", 2, 71)
    assert result.capacity_per_rank == 20 * GiB  # free memory when known


def test_nvml_failure_means_no_gpus(monkeypatch):
    def boom():
        raise RuntimeError("driver not loaded")

    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace(nvmlInit=boom))
    assert inv.probe_gpus({}) == []


def test_slurm_allocation(monkeypatch):
    monkeypatch.setattr(inv, "probe_gpus", lambda env=None: fake_gpus(4))
    env = {"SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "3", "SLURM_GPUS_ON_NODE": "4",
           "SLURM_JOB_NODELIST": "gpu[01-03]"}
    result = detect_inventory(env=env)
    assert (result.source, result.nodes, result.ranks_per_node, result.world_size) == ("slurm", 3, 4, 12)
    assert result.hostnames == ["gpu01", "gpu02", "gpu03"]
    assert result.gpu.total_bytes == 80 * GiB
    env2 = dict(env, SLURM_GPUS_ON_NODE="", SLURM_JOB_GPUS="0,1")
    assert detect_inventory(env=env2).ranks_per_node == 2


def test_slurm_without_gpus_is_cpu_ranks(monkeypatch):
    monkeypatch.setattr(inv, "probe_gpus", lambda env=None: [])
    result = detect_inventory(env={"SLURM_JOB_ID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "c[1-2]"})
    assert (result.device, result.nodes, result.ranks_per_node) == ("cpu", 2, 1)
    # a node list this parser cannot read only loses the host names (they are for display)
    odd = detect_inventory(env={"SLURM_JOB_ID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "c[1-"})
    assert (odd.nodes, odd.hostnames) == (2, []) and "host names not shown" in odd.notes[0]


def test_hostfile_inventory(monkeypatch, tmp_path):
    monkeypatch.setattr(inv, "probe_gpus", lambda env=None: fake_gpus(8))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("w1 slots=8\nw2 slots=8\n")
    result = detect_inventory(env={"FTLAUNCH_HOSTFILE": str(hostfile)})
    assert (result.source, result.nodes, result.ranks_per_node, result.hostnames) == ("hostfile", 2, 8, ["w1", "w2"])
    with pytest.raises(UserError, match="hostfile"):
        detect_inventory(env={"FTLAUNCH_HOSTFILE": str(tmp_path / "missing")})
    hostfile.write_bytes(b"\xff\xfe w1 slots=8\n")
    with pytest.raises(UserError, match="not a text file .byte 0xff at offset 0 is not UTF-8.; give a DeepSpeed"):
        detect_inventory(hostfile=str(hostfile), env={})


def test_precedence_spec_over_slurm(monkeypatch):
    monkeypatch.setattr(inv, "probe_gpus", lambda env=None: fake_gpus(4))
    env = {"SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "3", "SLURM_GPUS_ON_NODE": "4"}
    assert detect_inventory("1xRTX3090-24GB", env=env).source == "spec"
    assert detect_inventory(env={}).source == "nvml"


def test_launched_world_size_wins(monkeypatch):
    monkeypatch.setattr(inv, "probe_gpus", lambda env=None: fake_gpus(8))
    result = detect_inventory(env={"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})
    assert (result.nodes, result.ranks_per_node) == (1, 2)
    assert any("launcher runs 2 rank(s)" in note for note in result.notes)
    deepspeed_launcher = detect_inventory(env={"WORLD_SIZE": "4", "LOCAL_SIZE": "2"})  # deepspeed's name
    assert (deepspeed_launcher.nodes, deepspeed_launcher.ranks_per_node) == (2, 2)


def test_heterogeneous_local_gpus_plan_for_the_weakest(monkeypatch):
    gpus = fake_gpus(1) + [inv.GpuInfo("Tesla V100-SXM2-32GB", 32 * GiB, 30 * GiB, (7, 0))]
    monkeypatch.setattr(inv, "probe_gpus", lambda env=None: gpus)
    result = detect_inventory(env={})
    assert result.gpu.free_bytes == 30 * GiB and not result.gpu.supports_bf16


def test_inventory_json_is_plain():
    import json

    data = parse_spec("2x8xA100-80GB").to_json()
    json.dumps(data)
    assert data["world_size"] == 16 and data["device"] == "cuda"


def test_spec_typos_and_odd_sizes_are_said():
    """A misspelt card is an unknown one (with a did-you-mean note), not the catalogue card its name starts with;
    a size the card is not sold with is planned as given, and the plan says so."""
    typo = parse_spec("8xA10O-80GB")
    assert typo.gpu.name == "A10O" and any("not in the catalogue (did you mean A10" in n for n in typo.notes)
    assert parse_spec("8xH100SXM-80GB").gpu.name == "H100"
    for vendor_name, card in (("1xTeslaV100-32GB", "V100"), ("1xTeslaT4", "T4"), ("1xGeForceRTX3090", "RTX3090"),
                              ("1xNvidiaA100-80GB", "A100")):
        assert parse_spec(vendor_name).gpu.name == card, vendor_name
    assert not any("sold with" in n for n in parse_spec("1xMI300X").notes)  # its sold size, reported size unknown
    odd = parse_spec("1xRTX3090-80GB")
    assert odd.gpu.total_bytes == 80 * GiB and any("sold with 24 GB, not 80" in n for n in odd.notes)
