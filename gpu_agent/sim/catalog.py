"""What the simulated desktop has installed: Ollama models and ComfyUI checkpoints.

Every figure is taken from `shared/hardware-figures.md` (RTX 4070 SUPER, Q4_K_M models, fp16
checkpoints) or, for the embedding models, from their Ollama library pages and the observations
cited beside them; the arithmetic that turns them into these fields is in the comments, and what
is an estimate says so.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from gpu_common.model_names import normalize_model_name

MIB = 1024**2
GIB = 1024**3

# Bandwidths used for the CPU-offload penalty (hardware-figures.md §2b): decode time per token is
# weights_on_gpu / 504 GB/s + weights_on_cpu / 50 GB/s plus a fixed overhead.
GPU_BANDWIDTH_BYTES_PER_S = 504e9
CPU_BANDWIDTH_BYTES_PER_S = 50e9


@dataclass(frozen=True, slots=True)
class OllamaModelSpec:
    """One model as `ollama pull` left it on disk, and how it runs on a 4070 SUPER."""

    name: str
    family: str
    parameter_size: str
    quantization_level: str
    file_size_bytes: int
    weights_bytes: int
    # f16 KV cache per token of context: layers x 2 (K and V) x kv_heads x head_dim x 2 bytes.
    kv_bytes_per_token: int
    # Compute graph and scratch buffers; fixed per model at the default context.
    graph_bytes: int
    context_length: int
    load_cold_s: float
    load_warm_s: float
    # Full-GPU speeds; partial offload slows decode by the bandwidth rule above.
    decode_tokens_per_s: float
    prompt_tokens_per_s: float
    architecture: str
    capabilities: tuple[str, ...] = ("completion", "tools")
    # Length of one embedding vector: the model's hidden size (Ollama embeds with any model).
    embedding_length: int = 4096
    modified_at: str = "2026-09-14T10:21:07.418273915+02:00"
    template: str = "{{ .System }}\n{{ .Prompt }}"

    @property
    def embedding(self) -> bool:
        """An embedding model: it serves /api/embed, and generate and chat refuse it."""
        return "embedding" in self.capabilities

    @property
    def digest(self) -> str:
        """A stand-in for the blob's sha256: stable per name, as `/api/tags` lists it."""
        return hashlib.sha256(self.name.encode()).hexdigest()

    def required_bytes(self, num_ctx: int, num_parallel: int = 1) -> int:
        """Memory of a fully loaded runner: weights + KV cache for num_ctx x parallel + graph."""
        return (
            self.weights_bytes + self.kv_bytes_per_token * num_ctx * num_parallel + self.graph_bytes
        )

    def seconds_per_token(self, offload_fraction: float) -> float:
        """Decode time per token with `offload_fraction` of the weights in system RAM."""
        full = 1.0 / self.decode_tokens_per_s
        extra_per_byte = 1.0 / CPU_BANDWIDTH_BYTES_PER_S - 1.0 / GPU_BANDWIDTH_BYTES_PER_S
        return full + offload_fraction * self.weights_bytes * extra_per_byte

    def prompt_seconds(self, tokens: int, offload_fraction: float) -> float:
        """Prefill time: fixed overhead plus tokens at the prompt rate (0.3x of it at 50 % CPU)."""
        rate = self.prompt_tokens_per_s * (1.0 - 1.4 * min(0.5, offload_fraction))
        return 0.02 + tokens / rate


def _kv(layers: int, kv_heads: int, head_dim: int = 128) -> int:
    return layers * 2 * kv_heads * head_dim * 2


OLLAMA_MODELS: tuple[OllamaModelSpec, ...] = (
    # 3.0 GiB at ctx 4096 = 1.87 GiB weights + 448 MiB KV + graph.
    OllamaModelSpec(
        name="llama3.2:3b",
        family="llama",
        parameter_size="3.2B",
        quantization_level="Q4_K_M",
        file_size_bytes=2_019_393_189,
        weights_bytes=int(1.87 * GIB),
        kv_bytes_per_token=_kv(28, 8),
        graph_bytes=3 * GIB - int(1.87 * GIB) - _kv(28, 8) * 4096,
        context_length=131072,
        load_cold_s=2.0,
        load_warm_s=1.2,
        decode_tokens_per_s=165.0,
        prompt_tokens_per_s=9000.0,
        architecture="llama",
        embedding_length=3072,
    ),
    # 5.25 GiB at ctx 4096 = 4.36 GiB weights + 224 MiB KV + graph.
    OllamaModelSpec(
        name="qwen2.5:7b",
        family="qwen2",
        parameter_size="7.6B",
        quantization_level="Q4_K_M",
        file_size_bytes=4_683_087_332,
        weights_bytes=int(4.36 * GIB),
        kv_bytes_per_token=_kv(28, 4),
        graph_bytes=int(5.25 * GIB) - int(4.36 * GIB) - _kv(28, 4) * 4096,
        context_length=32768,
        load_cold_s=3.5,
        load_warm_s=1.8,
        decode_tokens_per_s=80.0,
        prompt_tokens_per_s=4000.0,
        architecture="qwen2",
        embedding_length=3584,
    ),
    # 10.0 GiB at ctx 4096 = 8.37 GiB weights + 768 MiB KV + graph.
    OllamaModelSpec(
        name="qwen2.5:14b",
        family="qwen2",
        parameter_size="14.8B",
        quantization_level="Q4_K_M",
        file_size_bytes=8_988_110_576,
        weights_bytes=int(8.37 * GIB),
        kv_bytes_per_token=_kv(48, 8),
        graph_bytes=10 * GIB - int(8.37 * GIB) - _kv(48, 8) * 4096,
        context_length=32768,
        load_cold_s=5.5,
        load_warm_s=2.3,
        decode_tokens_per_s=45.0,
        prompt_tokens_per_s=2000.0,
        architecture="qwen2",
        embedding_length=5120,
    ),
    # mistral-small (24b): 14.5 GiB at ctx 4096 = 13.1 GiB weights + 640 MiB KV + graph. It does
    # not fit in 12 GB, so it always runs partly on the CPU (about 9 tokens/s).
    OllamaModelSpec(
        name="mistral-small:latest",
        family="llama",
        parameter_size="23.6B",
        quantization_level="Q4_K_M",
        file_size_bytes=14_333_927_918,
        weights_bytes=int(13.1 * GIB),
        kv_bytes_per_token=_kv(40, 8),
        graph_bytes=int(14.5 * GIB) - int(13.1 * GIB) - _kv(40, 8) * 4096,
        context_length=32768,
        load_cold_s=8.0,
        load_warm_s=3.5,
        # Full-GPU speed by the bandwidth rule: 14.07 GB / 504 GB/s + 2.5 ms = 30 ms per token.
        decode_tokens_per_s=33.0,
        prompt_tokens_per_s=1100.0,
        architecture="llama",
        embedding_length=5120,
    ),
    # nomic-embed-text: 274 MB on https://ollama.com/library/nomic-embed-text:latest (nomic-bert,
    # 137M parameters, F16; 768 dimensions). An encoder keeps no KV cache. Ollama reported
    # memory.required.full = 352.9 MiB for it (github.com/intel/ipex-llm/issues/12912), so the
    # compute graph is the rest over the weights, ~92 MiB; `ollama ps` shows it at ctx 2048 even
    # though its Modelfile asks for 8192 (github.com/Crosstalk-Solutions/project-nomad/issues/
    # 1268): Ollama caps num_ctx at the 2048 tokens it was trained for. Load and prompt speeds
    # are estimates for a model this small (no published figure): a load is mostly the runner's
    # start-up, and prefill runs far above the 3b's 9,000 tokens/s.
    OllamaModelSpec(
        name="nomic-embed-text:latest",
        family="nomic-bert",
        parameter_size="137M",
        quantization_level="F16",
        file_size_bytes=274_000_000,
        weights_bytes=274_000_000,
        kv_bytes_per_token=0,
        graph_bytes=int(352.9 * MIB) - 274_000_000,
        context_length=2048,
        load_cold_s=1.0,
        load_warm_s=0.6,
        # An embedding model decodes nothing; the figure only keeps the arithmetic defined.
        decode_tokens_per_s=1000.0,
        prompt_tokens_per_s=30000.0,
        architecture="nomic-bert",
        capabilities=("embedding",),
        embedding_length=768,
    ),
    # bge-m3: 1.2 GB on https://ollama.com/library/bge-m3:latest (bert, 567M parameters, F16,
    # 8192-token context; 1024 dimensions). No published memory figure: the graph is nomic's
    # scaled by the hidden width (1024 / 768), an estimate; speeds are estimates too.
    OllamaModelSpec(
        name="bge-m3:latest",
        family="bert",
        parameter_size="567M",
        quantization_level="F16",
        file_size_bytes=1_200_000_000,
        weights_bytes=1_200_000_000,
        kv_bytes_per_token=0,
        graph_bytes=(int(352.9 * MIB) - 274_000_000) * 1024 // 768,
        context_length=8192,
        load_cold_s=1.6,
        load_warm_s=0.9,
        decode_tokens_per_s=1000.0,
        prompt_tokens_per_s=10000.0,
        architecture="bert",
        capabilities=("embedding",),
        embedding_length=1024,
    ),
)


@dataclass(frozen=True, slots=True)
class CheckpointFamily:
    """How one model family behaves in ComfyUI on a 4070 SUPER (hardware-figures.md §3)."""

    name: str
    unet_bytes: int
    clip_bytes: int
    vae_bytes: int
    base_width: int
    base_height: int
    # Sampler seconds per step at the base resolution, batch 1, all weights on the GPU.
    step_s: float
    # Activation memory while sampling at base resolution and batch 1; scales with pixels x batch.
    sampler_activation_bytes: int
    # VAE decode transient at base resolution and batch 1; ComfyUI tiles it beyond the cap.
    vae_activation_bytes: int
    vae_activation_cap_bytes: int
    vae_decode_s: float
    text_encode_s: float
    load_cold_s: float
    load_warm_s: float
    # Step time grows by (1 + penalty x share of the UNet left in system RAM) in low-VRAM mode.
    offload_penalty: float
    # Below this much UNet on the GPU even low-VRAM mode cannot run.
    min_resident_bytes: int

    @property
    def weights_bytes(self) -> int:
        return self.unet_bytes + self.clip_bytes + self.vae_bytes


SD15 = CheckpointFamily(
    name="sd15",
    unet_bytes=int(1639.41 * MIB),
    clip_bytes=int(235.84 * MIB),
    vae_bytes=int(159.56 * MIB),
    base_width=512,
    base_height=512,
    step_s=0.055,
    sampler_activation_bytes=512 * MIB,
    vae_activation_bytes=512 * MIB,
    vae_activation_cap_bytes=1024 * MIB,
    vae_decode_s=0.2,
    text_encode_s=0.03,
    load_cold_s=1.5,
    load_warm_s=0.7,
    offload_penalty=2.0,
    min_resident_bytes=256 * MIB,
)

SDXL = CheckpointFamily(
    name="sdxl",
    unet_bytes=int(4897.05 * MIB),
    clip_bytes=int(1560.80 * MIB),
    vae_bytes=int(159.56 * MIB),
    base_width=1024,
    base_height=1024,
    step_s=0.24,
    sampler_activation_bytes=int(1.2 * GIB),
    vae_activation_bytes=int(1.5 * GIB),
    vae_activation_cap_bytes=int(1.5 * GIB),
    vae_decode_s=0.6,
    text_encode_s=0.1,
    load_cold_s=3.5,
    load_warm_s=1.8,
    offload_penalty=1.17,
    min_resident_bytes=1 * GIB,
)

# Flux fp8 (UNet 11.9 GB + T5 4.9 GB + CLIP-L + VAE) never fits in 12 GB: ComfyUI always loads it
# partially. 2.1 s/step at ~11.5 GiB resident implies ~1.9 s/step if it all fitted.
FLUX = CheckpointFamily(
    name="flux",
    unet_bytes=int(11.9e9),
    clip_bytes=int(4.9e9) + int(0.25e9),
    vae_bytes=int(0.17e9),
    base_width=1024,
    base_height=1024,
    step_s=1.9,
    sampler_activation_bytes=int(0.8 * GIB),
    vae_activation_bytes=int(1.5 * GIB),
    vae_activation_cap_bytes=int(1.5 * GIB),
    vae_decode_s=0.7,
    text_encode_s=0.6,
    load_cold_s=15.0,
    load_warm_s=8.0,
    offload_penalty=0.33,
    min_resident_bytes=2 * GIB,
)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A checkpoint file in ComfyUI's models/checkpoints folder."""

    filename: str
    family: CheckpointFamily


CHECKPOINTS: tuple[Checkpoint, ...] = (
    Checkpoint("sd_xl_base_1.0.safetensors", SDXL),
    Checkpoint("juggernautXL_v9.safetensors", SDXL),
    Checkpoint("v1-5-pruned-emaonly-fp16.safetensors", SD15),
    Checkpoint("flux1-dev-fp8.safetensors", FLUX),
    Checkpoint("flux1-schnell-fp8.safetensors", FLUX),
)


@dataclass(frozen=True)
class Catalog:
    """The installed models of one simulated desktop."""

    ollama_models: tuple[OllamaModelSpec, ...] = OLLAMA_MODELS
    checkpoints: tuple[Checkpoint, ...] = CHECKPOINTS
    _by_name: dict[str, OllamaModelSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {m.name: m for m in self.ollama_models})

    def ollama_model(self, name: str) -> OllamaModelSpec | None:
        """Look a model up by name; a name without a tag means `:latest`, as Ollama does."""
        return self._by_name.get(normalize_model_name(name))

    def checkpoint(self, filename: str) -> Checkpoint | None:
        """The checkpoint with this file name (as in `ckpt_name`), or None if not installed."""
        return next((c for c in self.checkpoints if c.filename == filename), None)
