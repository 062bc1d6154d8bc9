"""The Qwen2.5-VL model on megatron-core: ViT on the first PP stage, embedding splice, M-RoPE GPTModel.

``Qwen25VLModel`` is one PP stage of the model (the usual megatron ``pre_process`` / ``post_process``
flags). Stage 0 holds the vision tower and the word embedding; it replaces the ``<|image_pad|>`` /
``<|video_pad|>`` token embeddings with the vision features before the decoder. The last stage holds the
final norm and the output layer. Two input layouts:

- padded batch (BSHD): ``input_ids [b, s]``, optional ``attention_mask [b, s]`` (1 = token, 0 = padding),
- packed (THD): ``input_ids [1, T]`` with ``packed_seq_params`` (cu_seqlens of the packed samples).

``position_ids`` are the 3D M-RoPE ids ``[3, b, s]`` (``rope_index``); when omitted they are computed here
from ``input_ids`` and the grids, which every stage can do.

Output on the last stage: logits ``[b, s, padded_vocab / TP]`` (vocab-parallel; padded vocabulary columns
are -inf so softmax / argmax ignore them) or, with ``labels``, the per-token cross entropy ``[b, s]``.
Other stages return hidden states ``[s, b, h]`` for the pipeline.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from m2mega.runtime.compat import output_layer_skipped

from .config import Qwen25VLConfig
from .layer_specs import language_block_spec
from .rope_index import get_rope_index_batch, get_rope_index_packed
from .vision import VisionTransformer

__all__ = ["Qwen25VLModel", "build_model"]


class Qwen25VLModel(MegatronModule):
    def __init__(
        self,
        cfg: Qwen25VLConfig,
        language_config,
        vision_config=None,
        merger_config=None,
        *,
        pre_process: bool = True,
        post_process: bool = True,
        add_vision: bool | None = None,
        parallel_output: bool = True,
        attn_backend: str | None = None,
        vp_stage: int | None = None,
    ):
        super().__init__(config=language_config)
        self.cfg = cfg
        self.pre_process = pre_process
        self.post_process = post_process
        self.add_vision = pre_process if add_vision is None else add_vision
        self.vocab_size = cfg.text.vocab_size
        self.padded_vocab_size = cfg.padded_vocab_size(language_config.tensor_model_parallel_size)
        self.share_embeddings_and_output_weights = cfg.text.tie_word_embeddings
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        if self.add_vision:
            if vision_config is None or merger_config is None:
                raise ValueError("the first stage needs vision_config and merger_config")
            self.vision_model = VisionTransformer(vision_config, merger_config, cfg.vision, attn_backend)
        self.language_model = GPTModel(
            config=language_config,
            transformer_layer_spec=language_block_spec(language_config, vp_stage=vp_stage, backend=attn_backend),
            vocab_size=self.padded_vocab_size,
            max_sequence_length=cfg.text.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=cfg.text.tie_word_embeddings,
            position_embedding_type="mrope",
            rotary_base=cfg.text.rope_theta,
            # The vision splice needs the full sequence; we scatter for sequence parallelism ourselves.
            scatter_embedding_sequence_parallel=False,
            vp_stage=vp_stage,
        )

    # Pipeline schedules hand the previous stage's activations here.
    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def output_weight(self) -> Tensor:
        """The (vocab-parallel, padded) output projection ``[V_pad / TP, h]`` of the last stage."""
        if not self.post_process:
            raise RuntimeError("only the last pipeline stage holds the output layer")
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.language_model.output_layer.weight

    # ------------------------------------------------------------------ helpers
    def compute_position_ids(
        self,
        input_ids: Tensor,
        image_grid_thw: Optional[Tensor] = None,
        video_grid_thw: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        second_per_grid_ts: Optional[Tensor] = None,
    ) -> Tensor:
        """3D M-RoPE ids ``[3, b, s]`` (THD: ``[3, 1, T]``, each packed sample restarting at 0)."""
        kw = dict(
            image_token_id=self.cfg.image_token_id,
            video_token_id=self.cfg.video_token_id,
            vision_start_token_id=self.cfg.vision_start_token_id,
            spatial_merge_size=self.cfg.vision.spatial_merge_size,
            video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts,
            tokens_per_second=self.cfg.vision.tokens_per_second,
        )
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            cu = packed_seq_params.cu_seqlens_q_padded
            cu = packed_seq_params.cu_seqlens_q if cu is None else cu
            real = packed_seq_params.cu_seqlens_q
            ids = input_ids.reshape(-1)
            samples = [ids[int(cu[i]) : int(cu[i]) + int(real[i + 1] - real[i])] for i in range(len(cu) - 1)]
            pos, _ = get_rope_index_packed(samples, image_grid_thw, **kw)
            out = torch.zeros(3, ids.numel(), dtype=torch.long, device=ids.device)
            off = 0
            for i, smp in enumerate(samples):  # padding after each sample keeps position 0
                out[:, int(cu[i]) : int(cu[i]) + smp.numel()] = pos[:, off : off + smp.numel()].to(ids.device)
                off += smp.numel()
            return out.unsqueeze(1)
        pos, _ = get_rope_index_batch(input_ids, attention_mask, image_grid_thw, **kw)
        return pos

    def _splice_vision(self, emb: Tensor, input_ids: Tensor, pixel_values, image_grid_thw, pixel_values_videos,
                       video_grid_thw, vision_meta=None) -> Tensor:
        """Replace image/video placeholder embeddings (row-major over [b, s], like HF) with ViT features."""
        parts = [(pixel_values, image_grid_thw, self.cfg.image_token_id, "image"),
                 (pixel_values_videos, video_grid_thw, self.cfg.video_token_id, "video")]
        parts = [p for p in parts if p[0] is not None]
        if not parts:
            return emb
        if not self.add_vision:
            raise ValueError("pixel values given to a stage without the vision tower")
        for pv, grid, _, kind in parts:
            if grid is None:
                raise ValueError(f"{kind} pixel values given without {kind}_grid_thw")
        feats = self.vision_model(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), vision_meta)
        m2 = self.cfg.vision.spatial_merge_size**2
        emb = emb.transpose(0, 1)  # [b, s, h]
        start = 0
        for pv, grid, token_id, kind in parts:
            n = int(grid.prod(-1).sum().item()) // m2
            mask = input_ids == token_id
            if int(mask.sum()) != n:
                raise ValueError(
                    f"{int(mask.sum())} {kind} placeholder tokens in input_ids but the {kind} grids "
                    f"{grid.tolist()} give {n} features"
                )
            emb = emb.masked_scatter(mask.unsqueeze(-1), feats[start : start + n].to(emb.dtype))
            start += n
        return emb.transpose(0, 1).contiguous()

    def _mask_padded_vocab(self, logits: Tensor) -> Tensor:
        if self.padded_vocab_size == self.vocab_size:
            return logits
        per_rank = logits.shape[-1]
        # Gathered logits (runtime_gather_output, forced by megatron in inference) span the whole vocab.
        gathered = per_rank == self.padded_vocab_size
        first = 0 if gathered else parallel_state.get_tensor_model_parallel_rank() * per_rank
        cols = torch.arange(first, first + per_rank, device=logits.device)
        return logits.masked_fill(cols >= self.vocab_size, float("-inf"))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor,
        position_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        pixel_values: Optional[Tensor] = None,
        image_grid_thw: Optional[Tensor] = None,
        pixel_values_videos: Optional[Tensor] = None,
        video_grid_thw: Optional[Tensor] = None,
        second_per_grid_ts: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        vision_meta: Optional[tuple] = None,
        inference_context=None,
        runtime_gather_output: Optional[bool] = None,
        return_hidden: bool = False,
    ) -> Tensor:
        """See the module docstring. ``return_hidden=True`` makes the last stage return the final-norm
        hidden states ``[s, b, h]`` instead of logits, for callers that apply the output layer themselves
        without materialising ``s x b x V`` logits (GRPO's fused log-prob kernel). THD conveniences: ``input_ids`` / ``labels`` may be ``[T]`` and
        ``position_ids`` ``[3, T]`` (the data loader's layout). ``vision_meta``: the packing op's
        ``(cu_seqlens, window_index, cu_window_seqlens, rot_pos_ids)`` for the concatenated image+video
        grids, to skip recomputing them."""
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if thd:
            if input_ids.dim() == 1:
                input_ids = input_ids.unsqueeze(0)
            if labels is not None and labels.dim() == 1:
                labels = labels.unsqueeze(0)
            if position_ids is not None and position_ids.dim() == 2:
                position_ids = position_ids.unsqueeze(1)
        if thd and input_ids.shape[0] != 1:
            raise ValueError(f"packed (THD) input must be one row [1, T], got {tuple(input_ids.shape)}")
        if thd and attention_mask is not None:
            raise ValueError("packed (THD) input takes no attention_mask: cu_seqlens define the samples")
        if position_ids is None:
            position_ids = self.compute_position_ids(
                input_ids, image_grid_thw, video_grid_thw, attention_mask, packed_seq_params, second_per_grid_ts
            )
        mask = None
        if attention_mask is not None:
            # megatron convention: True = masked; [b, 1, 1, s] masks padding keys (causality is added later).
            mask = ~attention_mask.bool()[:, None, None, :]

        decoder_input = None
        if self.pre_process:
            emb = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
            decoder_input = self._splice_vision(
                emb, input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, vision_meta
            )
            if self.config.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)

        lm = self.language_model
        with output_layer_skipped(lm, return_hidden and self.post_process):
            out = lm(
                input_ids=input_ids,
                position_ids=position_ids,
                attention_mask=mask,
                decoder_input=decoder_input,
                labels=None,
                packed_seq_params=packed_seq_params,
                inference_context=inference_context,
                runtime_gather_output=runtime_gather_output,
            )
        if not self.post_process or return_hidden:
            return out
        logits = self._mask_padded_vocab(out)  # [b, s, v/tp]
        if labels is None:
            return logits
        # megatron's vocab-parallel cross entropy over [s, b, v/tp] in fp32 (as HF upcasts); returns [b, s].
        # Ignored labels (-100) fall outside every rank's vocab slice: finite values, to be masked by the caller.
        return self.language_model.compute_language_model_loss(labels, logits.transpose(0, 1).float().contiguous())


def build_model(
    cfg: Qwen25VLConfig,
    dtype: torch.dtype = torch.float32,
    *,
    first_stage_layers: int | None = None,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    parallel_output: bool = True,
    attn_backend: str | None = None,
    language_overrides: dict | None = None,
    vision_overrides: dict | None = None,
) -> Qwen25VLModel:
    """This process's stage of the model, for the TP x PP layout of megatron's ``parallel_state``
    (call ``m2mega.runtime.init(tp, pp)`` first)."""
    ps = parallel_state
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    pre = ps.is_pipeline_first_stage() if pre_process is None else pre_process
    post = ps.is_pipeline_last_stage() if post_process is None else post_process
    lang = cfg.language_transformer_config(tp, pp, dtype, first_stage_layers, **(language_overrides or {}))
    vis = cfg.vision_transformer_config(tp, dtype, **(vision_overrides or {})) if pre else None
    mer = cfg.merger_transformer_config(tp, dtype) if pre else None
    model = Qwen25VLModel(cfg, lang, vis, mer, pre_process=pre, post_process=post,
                          parallel_output=parallel_output, attn_backend=attn_backend)
    from m2mega.runtime import device

    return model.to(device())
