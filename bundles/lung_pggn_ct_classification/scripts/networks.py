"""The three classifiers: image-only (3D ResNet-18 with depthwise separable convolutions),
tabular-only (per-feature embeddings with random feature masking and a reconstruction head) and
fusion (frozen encoders of both, concatenated projections, MLP with dropout).

All return one logit per nodule, shape (B, 1), in eval mode. The tabular network in training mode
returns (B, 1 + F): the logit, then the reconstruction residual of the F standardized features
(reconstruction minus input), which :class:`scripts.engine.BCEWithReconstructionLoss` turns into
the reconstruction term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.layers.factories import Act, Norm
from monai.networks.nets import ResNet

from .checkpoint import load_weights

__all__ = [
    "DepthwiseSeparableConv",
    "DepthwiseSeparableResNetBlock",
    "ImageClassifier",
    "TabularClassifier",
    "FusionClassifier",
    "prepare_for_training",
]


class DepthwiseSeparableConv(nn.Sequential):
    """A k^3 depthwise convolution (one filter per channel) followed by a 1x1x1 pointwise one.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: depthwise kernel size. Default 3.
        stride: depthwise stride. Default 1.
        spatial_dims: 2 or 3. Default 3.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, spatial_dims: int = 3
    ):
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        super().__init__(
            conv(
                in_channels,
                in_channels,
                kernel_size,
                stride=stride,
                padding=kernel_size // 2,
                groups=in_channels,
                bias=False,
            ),
            conv(in_channels, out_channels, 1, bias=False),
        )


class DepthwiseSeparableResNetBlock(nn.Module):
    """MONAI's ``ResNetBlock`` (two 3x3x3 convolutions and a shortcut) with depthwise separable
    convolutions; same constructor, so it can be given to ``monai.networks.nets.ResNet(block=...)``.

    Args:
        in_planes: input channels.
        planes: output channels.
        spatial_dims: 2 or 3. Default 3.
        stride: stride of the first convolution. Default 1.
        downsample: shortcut projection. Default None (identity).
        act: activation. Default ReLU.
        norm: normalization. Default batch.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, spatial_dims: int = 3, stride: int = 1, downsample=None,
                 act: str | tuple = ("relu", {"inplace": True}), norm: str | tuple = "batch"):  # fmt: skip
        super().__init__()
        norm_name, norm_args = (norm, {}) if isinstance(norm, str) else norm
        act_name, act_args = (act, {}) if isinstance(act, str) else act
        norm_type = Norm[norm_name, spatial_dims]
        self.conv1 = DepthwiseSeparableConv(in_planes, planes, 3, stride, spatial_dims)
        self.bn1 = norm_type(planes, **norm_args)
        self.act = Act[act_name](**act_args)
        self.conv2 = DepthwiseSeparableConv(planes, planes, 3, 1, spatial_dims)
        self.bn2 = norm_type(planes, **norm_args)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + residual)


class ImageClassifier(nn.Module):
    """3D ResNet-18 (MONAI ``ResNet``, layers 2-2-2-2) with depthwise separable blocks, and a linear head.

    Args:
        in_channels: image channels. Default 1.
        widen_factor: channel multiplier of MONAI's ResNet (1.0: 64-128-256-512). Default 1.0.
        conv1_t_stride: stride of the stem convolution. Default 2.
        dropout: dropout before the head. Default 0.2.

    Input (B, C, H, W, D) -> logit (B, 1); :meth:`features` gives the pooled (B, ``out_features``).
    """

    def __init__(self, in_channels: int = 1, widen_factor: float = 1.0, conv1_t_stride: int = 2, dropout: float = 0.2):
        super().__init__()
        self.backbone = ResNet(
            block=DepthwiseSeparableResNetBlock, layers=[2, 2, 2, 2], block_inplanes=[64, 128, 256, 512],
            spatial_dims=3, n_input_channels=in_channels, conv1_t_size=3, conv1_t_stride=conv1_t_stride,
            no_max_pool=True, widen_factor=widen_factor, feed_forward=False, bias_downsample=False,
        )  # fmt: skip
        self.out_features = int(512 * widen_factor)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.out_features, 1))

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (B, out_features)."""
        return self.backbone(image)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image))


class TabularClassifier(nn.Module):
    """Per-feature embeddings with random feature masking, an MLP encoder, a classification head
    and a reconstruction head.

    Each feature (after an optional log1p and standardization with statistics fitted on the
    training rows, kept as buffers in the state dict) becomes ``value * w_i + b_i`` (an
    ``embed_dim`` vector per feature); a per-sample gate computed from all embeddings reweights
    them (the adaptive part); in training, each feature is replaced with probability
    ``mask_prob`` by its learned mask embedding. The encoder maps the embeddings to a latent
    vector (:meth:`features`) that feeds the logit and, in training, the reconstruction of every
    standardized feature.

    Args:
        in_features: number of feature columns F.
        embed_dim: embedding size per feature. Default 16.
        hidden_dim: encoder/decoder hidden size. Default 128.
        latent_dim: latent size. Default 64.
        mask_prob: probability of masking a feature in training. Default 0.15.
        dropout: encoder dropout. Default 0.1.
        log_transform: per feature, whether to apply log1p before standardizing (skewed sizes). Default None (none).

    Input (B, F) raw feature values -> logit (B, 1) in eval mode, (B, 1 + F) in training mode.
    """

    def __init__(self, in_features: int, embed_dim: int = 16, hidden_dim: int = 128, latent_dim: int = 64,
                 mask_prob: float = 0.15, dropout: float = 0.1,
                 log_transform: Sequence[bool] | None = None):  # fmt: skip
        super().__init__()
        if in_features < 1:
            raise ValueError("feature_columns is empty: the tabular model needs at least one feature column")
        self.in_features = in_features
        self.mask_prob = float(mask_prob)
        log = (
            torch.zeros(in_features, dtype=torch.bool)
            if log_transform is None
            else torch.as_tensor(list(log_transform), dtype=torch.bool)
        )
        if log.numel() != in_features:
            raise ValueError(f"log_transform has {log.numel()} entries, feature_columns {in_features}")
        self.register_buffer("log_transform", log)
        self.register_buffer("feature_mean", torch.zeros(in_features))
        self.register_buffer("feature_std", torch.ones(in_features))
        self.weight = nn.Parameter(torch.randn(in_features, embed_dim) * 0.5)
        self.bias = nn.Parameter(torch.zeros(in_features, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(in_features, embed_dim))
        flat = in_features * embed_dim
        self.gate = nn.Sequential(nn.Linear(flat, in_features), nn.Sigmoid())
        self.encoder = nn.Sequential(
            nn.Linear(flat, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, latent_dim), nn.GELU()
        )
        self.head = nn.Linear(latent_dim, 1)
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, in_features))
        self.out_features = latent_dim

    @torch.no_grad()
    def fit_normalization(self, features: torch.Tensor) -> None:
        """Set the standardization statistics from training features (N, F)."""
        x = self._log(torch.as_tensor(features, dtype=torch.float32).to(self.feature_mean.device))
        self.feature_mean.copy_(x.mean(0))
        self.feature_std.copy_(x.std(0).clamp_min(1e-6))

    def _log(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.log_transform, torch.log1p(x.clamp_min(0.0)), x)

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """Log (where set) and standardize raw features (B, F)."""
        return (self._log(x.float()) - self.feature_mean) / self.feature_std

    def _encode(self, z: torch.Tensor) -> torch.Tensor:
        tokens = z.unsqueeze(-1) * self.weight + self.bias  # (B, F, E)
        if self.training and self.mask_prob > 0:
            masked = torch.rand(z.shape, device=z.device) < self.mask_prob
            tokens = torch.where(masked.unsqueeze(-1), self.mask_token.expand_as(tokens), tokens)
        gate = self.gate(tokens.flatten(1)).unsqueeze(-1)
        return self.encoder((tokens * gate).flatten(1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Latent vector (B, latent_dim) of raw features (B, F)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"the tabular model takes {self.in_features} features, got {x.shape[-1]}")
        return self._encode(self.standardize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.standardize(x)
        latent = self._encode(z)
        logit = self.head(latent)
        if self.training:
            return torch.cat([logit, self.decoder(latent) - z], dim=1)
        return logit


class FusionClassifier(nn.Module):
    """Frozen image and tabular encoders, each projected, concatenated and classified by an MLP.

    Args:
        image_net: an :class:`ImageClassifier` (its ``features`` are used).
        tabular_net: a :class:`TabularClassifier` (its ``features`` are used).
        projection_dim: size of each projection. Default 64.
        hidden_dim: MLP hidden size. Default 64.
        dropout: MLP dropout. Default 0.5.
        freeze_encoders: keep both encoders fixed (no gradient, eval mode). Default True.

    Inputs image (B, C, H, W, D) and features (B, F) -> logit (B, 1).
    """

    def __init__(self, image_net: ImageClassifier, tabular_net: TabularClassifier, projection_dim: int = 64,
                 hidden_dim: int = 64, dropout: float = 0.5, freeze_encoders: bool = True):  # fmt: skip
        super().__init__()
        self.image_net = image_net
        self.tabular_net = tabular_net
        self.freeze_encoders = freeze_encoders
        if freeze_encoders:
            for p in list(image_net.parameters()) + list(tabular_net.parameters()):
                p.requires_grad_(False)
        self.image_projection = nn.Sequential(nn.Linear(image_net.out_features, projection_dim), nn.ReLU())
        self.tabular_projection = nn.Sequential(nn.Linear(tabular_net.out_features, projection_dim), nn.ReLU())
        self.mlp = nn.Sequential(
            nn.Linear(2 * projection_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, 1)
        )

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoders:  # frozen encoders keep their batch-norm statistics and no masking
            self.image_net.eval()
            self.tabular_net.eval()
        return self

    def load_encoders(self, image_checkpoint: str | None, tabular_checkpoint: str | None) -> None:
        """Load the trained image-only and tabular-only checkpoints into the encoders."""
        if image_checkpoint:
            load_weights(self.image_net, image_checkpoint, what="image encoder (image_checkpoint)")
        if tabular_checkpoint:
            load_weights(self.tabular_net, tabular_checkpoint, what="tabular encoder (tabular_checkpoint)")

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        fi = self.image_projection(self.image_net.features(image))
        ft = self.tabular_projection(self.tabular_net.features(features))
        return self.mlp(torch.cat([fi, ft], dim=1))


def prepare_for_training(network: nn.Module, train_rows: Sequence[dict], image_checkpoint: str | None = None,
                         tabular_checkpoint: str | None = None) -> nn.Module:  # fmt: skip
    """What a network needs before training: fusion loads its encoders, the tabular network fits
    its standardization on the training rows' ``features``. Returns the network."""
    if isinstance(network, FusionClassifier):
        network.load_encoders(image_checkpoint, tabular_checkpoint)
    elif isinstance(network, TabularClassifier):
        network.fit_normalization(torch.stack([torch.as_tensor(r["features"]) for r in train_rows]))
    return network
