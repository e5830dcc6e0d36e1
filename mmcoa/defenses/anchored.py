"""Anchored MMCoA: MMCoA's two adversarial branches plus FARE-style feature anchors on both towers.

loss = 0.5 * CLIP_loss(f(x'), g(t)) + 0.5 * CLIP_loss(f(x), g(t'))
       + anchor_image * ||f(x') - f_orig(x)||^2 + anchor_text * ||g(t') - g_orig(t)||^2

x' and t' are MMCoA's attacks (the image adversary against the zero-shot cross-entropy over the class
prompts, the text adversary against the KL between clean and edited caption embeddings); f_orig and
g_orig are the frozen original towers; the distances are FARE's (unnormalised embeddings, summed over
dimensions, batch mean). The contrastive terms make both towers robust on the fine-tuning task; the
anchors pull the adversarial embeddings of each tower back to the original's clean ones, which is
what keeps FARE's zero-shot transfer. The text adversary is meant to be a mixture of threat models
(for example word substitutions and character edits, ``finetune.text_attack`` as a list), so that the
text tower is not robust to one closed threat model only. With both anchor weights 0 the loss is MMCoA's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from mmcoa.defenses.base import DefenseOutput, DefenseParams, clip_loss, register_defense, squared_distance
from mmcoa.defenses.mmcoa import MMCoA


class AnchoredParams(DefenseParams):
    anchor_image: float = Field(1.0, ge=0, description="weight of ||f(x') - f_orig(x)||^2 (FARE's term)")
    anchor_text: float = Field(1.0, ge=0, description="weight of ||g(t') - g_orig(t)||^2 (FARE's term, text side)")


@register_defense("mmcoa_anchor")
class AnchoredMMCoA(MMCoA):
    label = "MMCoA+anchor"
    needs_original = True
    Params = AnchoredParams

    def loss(self, model, images, labels):
        adv_images, adv_captions = self.attack(model, images, labels)
        captions = [self.prompts[i] for i in labels.tolist()]
        orig = self.ctx.original
        with torch.no_grad():
            anchor_img = orig.encode_image(images, normalize=False).float()
            anchor_txt = self.encode_captions(orig, captions, normalize=False).float()
        n = len(images)
        scale = self.scale(model)
        img_adv, img_clean = model.encode_image(torch.cat([adv_images, images]), normalize=False).split(n)
        txt_clean, txt_adv = self.encode_captions(model, captions + adv_captions, normalize=False).split(n)
        targets = labels if self.ctx.same_class_targets else None
        loss_img = clip_loss(F.normalize(img_adv, dim=-1), F.normalize(txt_clean, dim=-1), scale, targets)
        loss_txt = clip_loss(F.normalize(img_clean, dim=-1), F.normalize(txt_adv, dim=-1), scale, targets)
        dist_img = squared_distance(img_adv, anchor_img)
        dist_txt = squared_distance(txt_adv, anchor_txt)
        o = self.options
        loss = 0.5 * loss_img + 0.5 * loss_txt + o.anchor_image * dist_img + o.anchor_text * dist_txt
        changed = sum(a != c for a, c in zip(adv_captions, captions)) / max(n, 1)
        return DefenseOutput(
            loss, {"loss": loss.item(), "loss_adv_image": loss_img.item(), "loss_adv_text": loss_txt.item(),
                   "anchor_image": dist_img.item(), "anchor_text": dist_txt.item(),
                   "text_changed": changed, "scale": scale.item()}
        )
