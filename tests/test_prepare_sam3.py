"""The SAM3 segmenter's plumbing on a tiny randomly initialised Sam3VideoModel saved in transformers' layout
(the real weights are a gated download): loading a folder, our own pre/post-processing around the streaming
session, ids, sizes, bounded memory, and the choice/error paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from scail2_lite.errors import UserError
from scail2_lite.prepare import PrepareSettings, SegmenterName
from scail2_lite.prepare.sam3 import WORK_SIDE, Sam3Segmenter
from scail2_lite.prepare.segmenter import open_segmenter

SIZE = 224  # model input side (the real model: 1008)
HIDDEN = 128  # the tracker's memory (64 channels, fixed in transformers) must stay narrower than this


def tiny_config():
    from transformers import Sam3TrackerVideoConfig, Sam3VideoConfig
    from transformers.models.sam3.configuration_sam3 import (
        Sam3Config,
        Sam3DETRDecoderConfig,
        Sam3DETREncoderConfig,
        Sam3GeometryEncoderConfig,
        Sam3MaskDecoderConfig,
        Sam3VisionConfig,
        Sam3ViTConfig,
    )

    backbone = Sam3ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             image_size=SIZE, patch_size=14, window_size=8, global_attn_indexes=[0, 1])
    vision = Sam3VisionConfig(backbone_config=backbone, fpn_hidden_size=HIDDEN, scale_factors=[4.0, 2.0, 1.0, 0.5])
    detector = Sam3Config(
        vision_config=vision,
        text_config=dict(vocab_size=1000, hidden_size=32, intermediate_size=64, projection_dim=HIDDEN,
                         num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=32, hidden_act="gelu"),
        geometry_encoder_config=Sam3GeometryEncoderConfig(hidden_size=HIDDEN, num_layers=1, num_attention_heads=4,
                                                          intermediate_size=64, mask_fuser_hidden_size=HIDDEN,
                                                          mask_fuser_num_layers=1),
        detr_encoder_config=Sam3DETREncoderConfig(hidden_size=HIDDEN, num_layers=1, num_attention_heads=4,
                                                  intermediate_size=64),
        detr_decoder_config=Sam3DETRDecoderConfig(hidden_size=HIDDEN, num_layers=1, num_queries=2,
                                                  num_attention_heads=4, intermediate_size=64),
        mask_decoder_config=Sam3MaskDecoderConfig(hidden_size=HIDDEN, num_upsampling_stages=3),
    )
    tracker = Sam3TrackerVideoConfig(
        vision_config=vision, prompt_encoder_config=dict(hidden_size=HIDDEN, image_size=SIZE, patch_size=14),
        mask_decoder_config=dict(hidden_size=HIDDEN, mlp_dim=64, num_attention_heads=4, iou_head_hidden_dim=32),
        memory_attention_num_layers=1, memory_attention_hidden_size=HIDDEN, memory_encoder_hidden_size=HIDDEN,
        mask_downsampler_embed_dim=HIDDEN, memory_fuser_embed_dim=HIDDEN, memory_attention_feed_forward_hidden_size=64,
        memory_attention_rope_feat_sizes=[SIZE // 14, SIZE // 14], memory_fuser_num_layers=1,
        memory_fuser_intermediate_dim=64,
    )
    # Thresholds at 0 so that random weights still report objects.
    config = Sam3VideoConfig(detector_config=detector, tracker_config=tracker, low_res_mask_size=SIZE // 14 * 4,
                             score_threshold_detection=0.0, new_det_thresh=0.0)
    config.image_size = SIZE
    return config


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A SAM3 folder as `hf download facebook/sam3` gives it: config, safetensors, CLIP tokenizer, processor."""
    from transformers import CLIPTokenizer, Sam3VideoModel

    folder = tmp_path_factory.mktemp("sam3")
    torch.manual_seed(0)
    Sam3VideoModel(tiny_config()).save_pretrained(folder)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt")).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": SIZE, "width": SIZE}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    return folder


@pytest.fixture(scope="module")
def segmenter(weights) -> Sam3Segmenter:
    return Sam3Segmenter.load(weights, "person", device="cpu")


def test_image_gives_probability_maps_in_the_pictures_shape(segmenter):
    rgb = np.random.default_rng(0).integers(0, 256, (120, 200, 3), dtype=np.uint8)
    maps = segmenter.image(rgb, 2)
    assert len(maps) in (1, 2)  # at most the 2 asked for, at least one
    for m in maps:
        assert m.dtype == np.float32 and m.shape == (round(120 * WORK_SIDE / 200), WORK_SIDE)
        assert 0.0 <= m.min() and m.max() <= 1.0 and m.max() > 0.5
    assert segmenter.pixels(rgb).shape == (3, SIZE, SIZE)
    assert segmenter.pixels(np.full((10, 10, 3), 255, np.uint8)).max() == pytest.approx(1.0)  # (1 - 0.5) / 0.5


def test_video_session_streams_with_sam3_ids(segmenter):
    rng = np.random.default_rng(1)
    session = segmenter.video(2)
    for _ in range(2):
        found = session.detect(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
        assert found and all(isinstance(d.key, int) for d in found)
        assert len({d.key for d in found}) == len(found)
        assert all(d.soft.shape == (384, WORK_SIDE) for d in found)
    assert len(session._state.processed_frames) == 1  # frames are not kept: memory stays bounded


def test_choice_and_errors(weights, tmp_path):
    base = dict(out=tmp_path / "o", image=tmp_path / "a.png", video=tmp_path / "v.mp4")
    chosen = open_segmenter(PrepareSettings(**base, sam3=weights, prompt_object="dog"))
    assert isinstance(chosen, Sam3Segmenter) and chosen.prompt == "dog"
    with pytest.raises(UserError, match="needs its weights"):
        open_segmenter(PrepareSettings(**base, segmenter=SegmenterName.SAM3))
    with pytest.raises(UserError, match="no config.json"):
        open_segmenter(PrepareSettings(**base, sam3=tmp_path))
