"""What hardware a run gets: GPUs (NVML), a Slurm allocation, a DeepSpeed hostfile, or a what-if spec.

Plain data, no torch: `ftlaunch plan` must answer in well under a second. Everything here is pure except the
`probe_*` functions, which read NVML, /proc and /dev/shm and fail soft (a machine with no GPU is valid: CPU ranks).
A spec's memory is the size a card is sold as ("H100-80GB"); a known card is planned with what it reports through
NVML (an H100 80GB reports 81559 MiB, 79.6 GiB; a T4 16GB 15360 MiB), so a what-if plans as the live card would.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional

from launcher.errors import UserError
from launcher.nodelist import expand_nodelist

GiB = 1024 ** 3
SPEC_HELP = "expected [NODES x] GPUS x NAME[-MEM], e.g. 1xRTX3090-24GB"
# Bounds of a what-if spec (largest cards: 192-288 GB; clusters: ~10^5 GPUs; nodes: 8-16): beyond, it is a typo.
SPEC_GPU_GB = (1, 1024)
SPEC_MAX_NODES, SPEC_MAX_GPUS_PER_NODE, SPEC_MAX_CPU_RANKS = 100_000, 64, 1024
DEFAULT_HOSTFILE = "/job/hostfile"  # where the deepspeed launcher looks when given no --hostfile


@dataclass(frozen=True)
class GpuModel:
    """Catalogue entry: what a planner needs to know about a GPU kind it may never have seen."""

    memory: tuple  # (size sold in GB, MiB it reports through NVML or None if unchecked); the first is the default
    compute_capability: tuple  # bf16 needs >= (8, 0)
    tflops16: float  # dense bf16/fp16 tensor-core peak, for the cost model only
    intra_node_gbps: float  # effective GPU<->GPU bandwidth inside a node (NVLink or PCIe), GB/s
    inter_node_gbps: float  # effective per-GPU network bandwidth between nodes, GB/s


# Published specs, rounded. PCIe cards get ~12 GB/s peer bandwidth; SXM parts their NVLink bus bandwidth. The MiB
# are nvidia-smi's memory.total as users post it (L40 assumed equal to the L40S and A40, which share its memory).
GPU_CATALOGUE: dict[str, GpuModel] = {
    "T4": GpuModel(((16, 15360),), (7, 5), 65, 12, 6),
    "V100": GpuModel(((32, 32510), (16, 16160)), (7, 0), 125, 130, 12),
    "RTX3090": GpuModel(((24, 24576),), (8, 6), 71, 12, 6),
    "RTX4090": GpuModel(((24, 24564),), (8, 9), 165, 12, 6),
    "A10": GpuModel(((24, 23028),), (8, 6), 125, 12, 6),
    "A10G": GpuModel(((24, 23028),), (8, 6), 70, 12, 6),
    "L4": GpuModel(((24, 23034),), (8, 9), 121, 12, 6),
    "A6000": GpuModel(((48, 49140),), (8, 6), 155, 12, 6),
    "A40": GpuModel(((48, 46068),), (8, 6), 150, 12, 6),
    "L40": GpuModel(((48, 46068),), (8, 9), 181, 12, 12),
    "L40S": GpuModel(((48, 46068),), (8, 9), 362, 12, 12),
    "A100": GpuModel(((80, 81920), (40, 40960)), (8, 0), 312, 230, 25),
    "H100": GpuModel(((80, 81559),), (9, 0), 989, 360, 50),
    "H200": GpuModel(((141, 143771),), (9, 0), 989, 360, 50),
    "B200": GpuModel(((180, 183359),), (10, 0), 2250, 720, 50),
    "MI300X": GpuModel(((192, None),), (9, 4), 1307, 300, 50),  # ROCm; capability only gates bf16 here
}
# Unknown names given with a size: assume a recent datacenter card (bf16-capable), and say so in the plan.
UNKNOWN_GPU = GpuModel((), (8, 0), 100, 12, 12)
CPU_TFLOPS = 0.2  # per CPU rank, for the cost model only


def _bare_gpu_name(name: str) -> str:
    """Upper case, no spaces, no vendor or family words: 'NVIDIA GeForce RTX 3090' -> 'RTX3090'."""
    text = re.sub(r"[\s_]+", "", name.upper()).replace("NVIDIA", "").replace("GEFORCE", "").replace("TESLA", "")
    return text.replace("RTXA6000", "A6000")


def canonical_gpu_name(name: str) -> str:
    """'NVIDIA GeForce RTX 3090' / 'rtx3090' / 'NVIDIA A100-SXM4-80GB' -> catalogue key ('RTX3090', 'A100')."""
    text = _bare_gpu_name(name)
    for key in sorted(GPU_CATALOGUE, key=len, reverse=True):  # longest first: L40S before L40, A10G before A10
        if text.startswith(key) or text.startswith(key + "-"):
            return key
    return text.split("-")[0] or name


@dataclass
class GpuInfo:
    name: str
    total_bytes: int
    free_bytes: Optional[int] = None  # known only when probed live
    compute_capability: tuple = (8, 0)

    @property
    def supports_bf16(self) -> bool:
        return tuple(self.compute_capability) >= (8, 0)

    @property
    def model(self) -> GpuModel:
        return GPU_CATALOGUE.get(canonical_gpu_name(self.name), UNKNOWN_GPU)

    @property
    def spec(self) -> str:
        """'T4-16GB': the name and the size it is sold as, which parse_spec turns back into this card."""
        sold = [gb for gb, mib in self.model.memory if mib and mib * 2 ** 20 == self.total_bytes]
        key = canonical_gpu_name(self.name)  # a live card's NVML name ('NVIDIA GeForce RTX 3090') -> 'RTX3090'
        return f"{key if key in GPU_CATALOGUE else self.name}-{sold[0] if sold else round(self.total_bytes / GiB)}GB"


@dataclass
class Inventory:
    """Homogeneous view of the ranks a run gets. `gpu` is None for CPU ranks."""

    source: str  # 'spec' | 'slurm' | 'hostfile' | 'nvml' | 'cpu'
    nodes: int
    ranks_per_node: int  # GPUs per node, or CPU ranks per node
    gpu: Optional[GpuInfo] = None
    host_ram_bytes: Optional[int] = None  # per node
    host_free_bytes: Optional[int] = None  # per node, when probed live
    host_ram_assumed: bool = False  # what-if specs guess the host RAM (see spec_inventory)
    cpu_count: Optional[int] = None
    shm_bytes: Optional[int] = None
    hostnames: list = field(default_factory=list)
    local_gpus: list = field(default_factory=list)  # every GpuInfo NVML saw on this node
    notes: list = field(default_factory=list)

    @property
    def device(self) -> str:
        return "cuda" if self.gpu is not None else "cpu"

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def capacity_per_rank(self) -> int:
        """Memory one rank may use: free GPU memory when known, else total; CPU ranks share the host RAM."""
        if self.gpu is not None:
            return self.gpu.free_bytes if self.gpu.free_bytes is not None else self.gpu.total_bytes
        ram = self.host_free_bytes or self.host_ram_bytes or 8 * GiB
        return ram // max(1, self.ranks_per_node)

    def describe(self) -> str:
        if self.gpu is None:
            what = f"{self.ranks_per_node} CPU rank(s)"
        else:
            what = f"{self.ranks_per_node}x {self.gpu.name} ({self.gpu.total_bytes / GiB:.3g} GiB, " \
                   f"cc {self.gpu.compute_capability[0]}.{self.gpu.compute_capability[1]})"
        return f"{self.nodes} node(s) x {what} [{self.source}]"

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(device=self.device, world_size=self.world_size, capacity_per_rank=self.capacity_per_rank)
        return out


# ---------------------------------------------------------------- parsers (pure, except that a `cpu` spec given no
# host RAM reads this host's)

# [NODES x] GPUS x NAME [-MEM[GB]]; the name is lazy so a trailing "-80GB" is never swallowed into it.
_SPEC = re.compile(r"^(?:(\d+)\s*[x*]\s*)?(?:(\d+)\s*[x*]\s*)?([a-z][a-z0-9]*?)"
                   r"(?:-(\d+(?:\.\d+)?)\s*(?:GB|GIB|G)?)?$", re.IGNORECASE)


def assumed_host_ram(gpus_per_node: int, gpu_bytes: int) -> int:
    """A what-if node has no host to probe: sized like a typical server, 2x its GPU memory, at least 64 GiB."""
    return max(64 * GiB, 2 * gpus_per_node * gpu_bytes)


def parse_spec(spec: str, host_ram_bytes: Optional[int] = None) -> Inventory:
    """`[NODES x] GPUS x NAME[-MEM]` or `[N x]cpu` -> Inventory. Bad spec -> UserError."""
    text = (spec or "").strip()
    match = _SPEC.match(text)
    bad = UserError(f"inventory spec '{spec}': {SPEC_HELP}")
    if not match:
        raise bad
    first, second, name, mem = match.groups()
    if name.lower() == "cpu":
        if second is not None or mem is not None:
            raise bad
        ranks = int(first) if first else 1
        if ranks < 1:
            raise bad
        if ranks > SPEC_MAX_CPU_RANKS:
            raise UserError(f"inventory spec '{spec}': {ranks} CPU ranks on one host; give at most "
                            f"{SPEC_MAX_CPU_RANKS}, e.g. 2xcpu")
        ram = host_ram_bytes if host_ram_bytes is not None else probe_host()[0]
        return Inventory("spec", 1, ranks, None, host_ram_bytes=ram, cpu_count=os.cpu_count(),
                         notes=[f"what-if '{text}': {ranks} CPU rank(s) sharing this host's RAM"])
    if first is None:  # a GPU spec always names a count
        raise bad
    nodes, gpus = (int(first), int(second)) if second is not None else (1, int(first))
    if nodes < 1 or gpus < 1:
        raise bad
    if nodes > SPEC_MAX_NODES or gpus > SPEC_MAX_GPUS_PER_NODE:
        raise UserError(f"inventory spec '{spec}': {nodes} node(s) x {gpus} GPU(s) is out of range; give at most "
                        f"{SPEC_MAX_NODES} nodes of at most {SPEC_MAX_GPUS_PER_NODE} GPUs, e.g. 4x8xH100-80GB")
    key, typed = canonical_gpu_name(name), _bare_gpu_name(name)
    if not (typed.startswith(key) and re.fullmatch(r"(SXM\d?|PCIE|NVL)?", typed[len(key):])):
        key = name  # 'A10O' is a typo, not an A10: an unknown card (with a did-you-mean note)
    model = GPU_CATALOGUE.get(key)
    notes = []
    if mem is None:
        if model is None:
            raise UserError(f"inventory spec '{spec}': unknown GPU '{name}', give its memory, e.g. {gpus}x{name}-48GB")
        mem_gib = model.memory[0][0]
    else:
        mem_gib = float(mem)
        if mem_gib <= 0:
            raise bad
        if not SPEC_GPU_GB[0] <= mem_gib <= SPEC_GPU_GB[1]:
            raise UserError(f"inventory spec '{spec}': {mem} GB per GPU is out of range; give "
                            f"{SPEC_GPU_GB[0]}-{SPEC_GPU_GB[1]} GB, e.g. {gpus}x{name}-80GB")
    total = int(mem_gib * GiB)
    reported = dict(model.memory).get(mem_gib) if model else None
    if model and mem_gib not in dict(model.memory):
        sold = " or ".join(f"{gb} GB" for gb, _ in model.memory)
        notes.append(f"{key} is sold with {sold}, not {mem_gib:g}: planned with {mem_gib:g} GiB as given")
    if reported:
        total = reported * 2 ** 20
        notes.append(f"{key} {mem_gib:g}GB reports {reported} MiB ({total / GiB:.1f} GiB) through NVML: planned with that")
    if model is None:
        model = UNKNOWN_GPU
        import difflib

        close = difflib.get_close_matches(key, list(GPU_CATALOGUE), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        notes.append(f"GPU '{name}' is not in the catalogue{hint}: assumed bf16-capable, "
                     f"{model.tflops16:.0f} TFLOPS")
    gpu = GpuInfo(key if key in GPU_CATALOGUE else name, total, None, model.compute_capability)
    ram = host_ram_bytes if host_ram_bytes is not None else assumed_host_ram(gpus, gpu.total_bytes)
    notes.append(f"host RAM per node {'given' if host_ram_bytes is not None else 'assumed'} {ram / GiB:.0f} GiB "
                 f"(what-if spec{'' if host_ram_bytes is not None else '; --host-ram GiB to set it'})")
    return Inventory("spec", nodes, gpus, gpu, host_ram_bytes=ram, host_ram_assumed=host_ram_bytes is None,
                     notes=notes)


def parse_hostfile(text: str) -> list[tuple[str, int]]:
    """DeepSpeed hostfile lines `host slots=N` (comments and blank lines allowed) -> [(host, slots)]."""
    hosts = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)", line)
        if not match or int(match.group(2)) < 1:
            raise UserError(f"hostfile line {number} '{raw.strip()}': expected 'HOST slots=N'")
        host = match.group(1)
        if host in first_line:  # the deepspeed launcher would start two sets of ranks on one node
            raise UserError(f"hostfile line {number}: host '{host}' is already on line {first_line[host]}; list each "
                            f"host once, with all its slots")
        first_line[host] = number
        hosts.append((host, int(match.group(2))))
    if not hosts:
        raise UserError("hostfile: no 'HOST slots=N' lines")
    return hosts


def slurm_gpus_per_node(env: Mapping[str, str]) -> Optional[int]:
    """SLURM_GPUS_ON_NODE ('4'), else SLURM_JOB_GPUS ('0,1,2,3')."""
    if env.get("SLURM_GPUS_ON_NODE", "").strip().isdigit():
        return int(env["SLURM_GPUS_ON_NODE"])
    ids = [g for g in env.get("SLURM_JOB_GPUS", "").split(",") if g.strip()]
    return len(ids) if ids else None


# ---------------------------------------------------------------- probes (fail soft)

def probe_gpus(env: Mapping[str, str] = os.environ) -> list[GpuInfo]:
    """Local GPUs through NVML; any failure (no driver, no pynvml) means no GPUs."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                capability = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle))
            except Exception:
                capability = GPU_CATALOGUE.get(canonical_gpu_name(name), UNKNOWN_GPU).compute_capability
            gpus.append(GpuInfo(name, int(memory.total), int(memory.free), capability))
        visible = env.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:  # respect the process's view; UUID lists are left alone
            ids = [v.strip() for v in visible.split(",") if v.strip()]
            if all(v.isdigit() for v in ids):
                gpus = [gpus[int(v)] for v in ids if int(v) < len(gpus)]
        return gpus
    except Exception:
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def probe_host() -> tuple[Optional[int], Optional[int], Optional[int], int]:
    """(host RAM total, RAM available, /dev/shm size, usable CPUs) of this machine."""
    total = available = shm = None
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.strip()}
        total, available = info.get("MemTotal"), info.get("MemAvailable")
    except (OSError, ValueError, IndexError):
        pass
    try:
        stat = os.statvfs("/dev/shm")
        shm = stat.f_blocks * stat.f_frsize
    except OSError:
        pass
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return total, available, shm, cpus


def slowest_gpu(gpus: list[GpuInfo]) -> Optional[GpuInfo]:
    """Plan for the weakest local GPU: the smallest free memory and the oldest capability bound every rank."""
    if not gpus:
        return None
    smallest = min(gpus, key=lambda g: (g.free_bytes if g.free_bytes is not None else g.total_bytes))
    oldest = min(g.compute_capability for g in gpus)
    return GpuInfo(smallest.name, smallest.total_bytes, smallest.free_bytes, oldest)


# ---------------------------------------------------------------- detection

def detect_inventory(spec: Optional[str] = None, env: Mapping[str, str] = os.environ,
                     hostfile: Optional[str] = None, host_ram_bytes: Optional[int] = None) -> Inventory:
    """spec > Slurm allocation > DeepSpeed hostfile > local NVML GPUs > CPU ranks.

    In a launched process (WORLD_SIZE set) the rank count is the launcher's, so the batch geometry matches what
    DeepSpeed asserts (train_batch_size == micro x accumulation x world size).
    """
    if spec is not None and not spec.strip():  # --inventory "$UNSET": a mistake, not a request to probe
        raise UserError("--inventory: empty; give a spec such as 1xRTX3090-24GB or 2xcpu, or leave it out to use the "
                        "hardware found")
    if spec and hostfile:
        raise UserError("give an inventory spec or a hostfile, not both (--inventory / --hostfile)")
    if spec:
        return parse_spec(spec, host_ram_bytes)
    if host_ram_bytes is not None:
        raise UserError("--host-ram: sets a what-if --inventory spec's host RAM; a real machine's is measured")
    total, available, shm, cpus = probe_host()
    host = dict(host_ram_bytes=total, host_free_bytes=available, shm_bytes=shm, cpu_count=cpus)
    local = probe_gpus(env)
    gpu = slowest_gpu(local)
    inventory = None
    nodes_env = env.get("SLURM_JOB_NUM_NODES", "").strip()
    if nodes_env.isdigit() and env.get("SLURM_JOB_ID"):
        gpus = slurm_gpus_per_node(env) or 0
        notes = []
        try:  # host names are for display only: a list this parser cannot read must not stop a run
            hostnames = expand_nodelist(env.get("SLURM_JOB_NODELIST", "")) if env.get("SLURM_JOB_NODELIST") else []
        except UserError as e:
            hostnames, notes = [], [f"host names not shown: {e}"]
        if gpus and gpu is None:
            notes.append("Slurm grants GPUs but NVML sees none on this node; pass --inventory to plan")
            gpu = GpuInfo("unknown", 0, None, (0, 0))
        ranks = gpus if gpus else _cpu_ranks(env)
        inventory = Inventory("slurm", int(nodes_env), ranks, gpu if gpus else None, hostnames=hostnames,
                              local_gpus=local, notes=notes, **host)
    else:
        path = hostfile or env.get("FTLAUNCH_HOSTFILE") or (DEFAULT_HOSTFILE if os.path.isfile(DEFAULT_HOSTFILE)
                                                             else None)
        if path:
            try:
                with open(path, encoding="utf-8") as f:
                    hosts = parse_hostfile(f.read())
            except OSError as e:
                raise UserError(f"hostfile {path}: {e.strerror}") from None
            except UnicodeDecodeError as e:
                raise UserError(f"hostfile {path}: not a text file (byte 0x{e.object[e.start]:02x} at offset {e.start} "
                                f"is not UTF-8); give a DeepSpeed hostfile of 'HOST slots=N' lines") from None
            slots = min(s for _, s in hosts)
            notes = [] if len({s for _, s in hosts}) == 1 else [f"hostfile slots differ; planning {slots} per node"]
            inventory = Inventory("hostfile", len(hosts), slots, gpu, hostnames=[h for h, _ in hosts],
                                  local_gpus=local, notes=notes, **host)
        elif local:
            inventory = Inventory("nvml", 1, len(local), gpu, local_gpus=local, **host)
        else:
            inventory = Inventory("cpu", 1, _cpu_ranks(env), None, **host)
    return _match_launcher(inventory, env)


def _local_world_size(env: Mapping[str, str]) -> str:
    """torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE."""
    return env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or ""


def _cpu_ranks(env: Mapping[str, str]) -> int:
    value = _local_world_size(env) or env.get("WORLD_SIZE") or "1"
    return int(value) if value.isdigit() and int(value) > 0 else 1


def _match_launcher(inventory: Inventory, env: Mapping[str, str]) -> Inventory:
    world = env.get("WORLD_SIZE", "")
    if not world.isdigit() or int(world) < 1 or int(world) == inventory.world_size:
        return inventory
    world_size = int(world)
    local = _local_world_size(env)
    per_node = int(local) if local.isdigit() and int(local) > 0 else min(inventory.ranks_per_node, world_size)
    nodes = max(1, world_size // per_node)
    inventory.notes.append(f"launcher runs {world_size} rank(s) ({nodes} x {per_node}); "
                           f"planning for those, not all {inventory.world_size} found")
    inventory.nodes, inventory.ranks_per_node = nodes, per_node
    return inventory
