"""iTPN pixel pre-training (MAE style): visible tokens through backbone + pyramid, a light decoder
predicts the normalized pixels of the masked patches."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from itpn_ds.models.hivit import HiViT
from itpn_ds.models.layers import attention_block


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """(grid², dim) fixed 2-D sin-cos embedding: first half encodes the column, second half the row."""
    if dim % 4:
        raise ValueError(f"sin-cos embedding dim must be a multiple of 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    encode = lambda pos: torch.cat([torch.sin(pos.reshape(-1, 1) * omega), torch.cos(pos.reshape(-1, 1) * omega)], 1)  # noqa: E731
    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def random_masking(batch: int, num_patches: int, mask_ratio: float, generator: torch.Generator | None = None,
                   device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ids_keep (B, L_keep), ids_restore (B, N), mask (B, N) float with 1 = masked."""
    keep = int(num_patches * (1 - mask_ratio))
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    return ids_shuffle[:, :keep], ids_restore, mask_from_ids(ids_restore, keep)


def ids_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) bool mask (True = masked, the same count per sample) -> ids_keep (B, L), ids_restore (B, N):
    the visible patches in index order, then the masked ones."""
    counts = mask.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"every sample must mask the same number of patches, got {counts.tolist()}")
    ids_shuffle = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
    return ids_shuffle[:, :mask.shape[1] - int(counts[0])], torch.argsort(ids_shuffle, dim=1)


def mask_from_ids(ids_restore: torch.Tensor, num_keep: int) -> torch.Tensor:
    """(B, N) float mask, 1 where a patch is not among the first ``num_keep`` of the shuffle."""
    mask = torch.ones(ids_restore.shape, device=ids_restore.device)
    mask[:, :num_keep] = 0
    return torch.gather(mask, 1, ids_restore)


class ITPNPixelMAE(HiViT):
    """``mlp_depth`` MLP blocks in both early stages, ``fpn_depth`` 2 pyramid blocks per level, no RPE; the
    encoder's absolute position embedding is sin-cos initialised and trained, the decoder's is fixed sin-cos
    (as published)."""

    def __init__(self, mlp_depth: int = 3, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, num_outs: int = 3, fpn_depth: int = 2, rpe: bool = False,
                 norm_pix_loss: bool = True, **kwargs):
        super().__init__(mlp_depth1=mlp_depth, mlp_depth2=mlp_depth, num_outs=num_outs, fpn_depth=fpn_depth, rpe=rpe,
                         **kwargs)
        if num_outs < 2:
            raise ValueError("ITPNPixelMAE needs the pyramid: num_outs must be 2 or 3")
        self.norm_pix_loss = norm_pix_loss
        dec, fpn_dim = decoder_embed_dim, self.fpn_dim
        mlp_ratio = self.main_blocks[0].mlp.fc1.out_features / self.embed_dim
        self.decoder_embed = nn.ModuleList(
            nn.Sequential(self.norm_layer(fpn_dim), nn.Linear(fpn_dim, dec // 4 ** level)) for level in range(num_outs))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec))
        self.decoder_pos_embed = nn.Parameter(sincos_2d(dec, self.grid)[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            attention_block(dec, decoder_num_heads, mlp_ratio, self.norm_layer) for _ in range(decoder_depth))
        self.decoder_norm = self.norm_layer(dec)
        self.decoder_pred = nn.Linear(dec, self.patch_size ** 2 * 3)
        self.init_weights()
        if self.ape:
            self.absolute_pos_embed.data.copy_(sincos_2d(self.embed_dim, self.grid)[None])
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, p²·3), pixels of each patch in (row, col, channel) order."""
        B, C, H, W = images.shape
        p = self.patch_size
        x = images.reshape(B, C, H // p, p, W // p, p)
        return torch.einsum("bchpwq->bhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)

    def visible_position_embedding(self, grid: int) -> torch.Tensor:
        """(1, grid², D) embedding as the published pixel model applies it to visible tokens.

        That code resamples the embedding bicubically with scale (grid + 0.1) / grid whenever tokens were
        dropped (its size check compares the visible count with N), which shifts it slightly at the same grid
        size. Official pixel checkpoints were trained with that shifted embedding, so we reproduce it.
        """
        n = math.isqrt(self.absolute_pos_embed.shape[1])
        pos = self.absolute_pos_embed.reshape(1, n, n, -1).permute(0, 3, 1, 2)
        scale = (grid + 0.1) / n
        pos = F.interpolate(pos, scale_factor=(scale, scale), mode="bicubic")
        return pos.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[1])

    def forward_encoder(self, x: torch.Tensor, ids_keep: torch.Tensor) -> list[torch.Tensor]:
        """Visible patches only -> pyramid levels [(B, L, s, s, F)]."""
        tokens, features = self.forward_stages(x, ids_keep)
        if self.ape:
            pos = self.visible_position_embedding(x.shape[-1] // self.patch_size).expand(tokens.shape[0], -1, -1)
            tokens = tokens + torch.gather(pos, 1, ids_keep[:, :, None].expand(-1, -1, pos.shape[-1]))
        tokens = self.pos_drop(tokens)
        tokens = self.forward_main(tokens, None)[0]
        return self.forward_pyramid(tokens, features)

    def forward_decoder(self, levels: list[torch.Tensor], ids_restore: torch.Tensor) -> torch.Tensor:
        """Levels of visible tokens -> per-patch pixel predictions (B, N, p²·3) for every patch."""
        B, L = levels[0].shape[:2]
        N = ids_restore.shape[1]
        fused = self.decoder_pos_embed.expand(B, -1, -1)
        for embed, level in zip(self.decoder_embed, levels):
            visible = embed(level).reshape(B, L, -1)
            full = torch.cat([visible, self.mask_token.expand(B, N - L, -1)], dim=1)
            fused = fused + torch.gather(full, 1, ids_restore[..., None].expand(-1, -1, full.shape[-1]))
        for i, blk in enumerate(self.decoder_blocks):
            fused = self.run_block(i, blk, fused)
        return self.decoder_pred(self.decoder_norm(fused))

    def per_patch_loss(self, images: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """(B, N) mean squared error of each patch's prediction; targets normalized per patch when
        ``norm_pix_loss``."""
        target = self.patchify(images)
        if self.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        return ((pred - target) ** 2).mean(dim=-1)

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean of ``per_patch_loss`` over the masked patches of the whole batch."""
        return (self.per_patch_loss(images, pred) * mask).sum() / mask.sum()

    def forward(self, images: torch.Tensor, mask_ratio: float = 0.75, ids_keep: torch.Tensor | None = None,
                ids_restore: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (loss, pred (B, N, p²·3), mask (B, N) 1 = masked). Samples a random mask unless ids are given."""
        B, N = images.shape[0], self.grid ** 2
        if (ids_keep is None) != (ids_restore is None):
            raise ValueError("pass both ids_keep and ids_restore, or neither")
        if ids_keep is None:
            ids_keep, ids_restore, mask = random_masking(B, N, mask_ratio, device=images.device)
        else:
            if ids_restore.shape != (B, N) or ids_keep.shape[0] != B or ids_keep.shape[1] > N:
                raise ValueError(f"ids_restore must be (B, N) = ({B}, {N}) and ids_keep (B, L<=N); got "
                                 f"{tuple(ids_restore.shape)} and {tuple(ids_keep.shape)}")
            mask = mask_from_ids(ids_restore, ids_keep.shape[1])
        pred = self.forward_decoder(self.forward_encoder(images, ids_keep), ids_restore)
        return self.forward_loss(images, pred, mask), pred, mask
