"""What a site's answers leak: membership inference and input inversion through the site's own answer policy.

A site runs the audit on its own model and data (``monai-fedkd audit``) before it agrees to answer a server. Both
attacks use only what the policy releases, exactly as the server would receive it (the same
:class:`~monai_fedkd.site.query.QuerySite` path):

- **membership inference**: the site's training images (members) and held-out images of the same distribution
  (non-members; by default the site's validation split: a test split may come from another distribution, as
  PneumoniaMNIST's does, and an attack would then detect the shift instead of membership) are sent as queries; the attacker scores each by the loss of the released answer on the true label
  (members have lower loss) and, where the policy returns gradients, by the norm of the returned input-gradient of
  that loss. Reported as attack AUROC per score and the best of them (0.5 = no leakage).
- **input inversion**: starting from noise, inputs are optimised to make the site answer a target class, using the
  returned vector-Jacobian products (or, when the policy returns none, a zeroth-order estimate from extra queries).
  Reported as the SSIM / PSNR of each inverted input to its nearest real training image, beside the same figure for
  held-out real images (what "looks like a training image" means) and for noise (what nothing means).

The query budget of the policy is lifted for the audit (it limits how many queries an attacker gets; the audit
measures what each query leaks) and the audit's own epsilon is reported.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from monai.transforms import Compose

from monai_fedkd.data.datalist import load_datalist
from monai_fedkd.data.transforms import card_preprocessing
from monai_fedkd.site.policy import AnswerPolicy, released_log_probabilities
from monai_fedkd.site.query import QuerySite
from monai_fedkd.transport.base import QueryRequest

__all__ = ["AuditError", "input_inversion", "membership_inference", "run_audit"]

logger = logging.getLogger(__name__)


class AuditError(ValueError):
    """An audit that cannot run as asked (segmentation site, too few images, ...)."""


def _audit_site(site_dir, policy: AnswerPolicy | Mapping | None, device) -> QuerySite:
    site = QuerySite(site_dir, device=device)
    if site.card["task"] != "classification":
        raise AuditError(f"the audit covers classification sites; {site_dir} is a {site.card['task']} site")
    chosen = site.policy if policy is None else (policy if isinstance(policy, AnswerPolicy) else AnswerPolicy.from_dict(policy))
    site.set_policy(dataclasses.replace(chosen, max_queries=None))
    return site


def _load(site: QuerySite, datalist, key: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    card = site.card
    items = load_datalist(datalist, key=key, task=card["task"], num_classes=card["classes"]["num_classes"])
    if len(items) < 2:
        raise AuditError(f"{datalist} '{key}' holds {len(items)} item(s); the audit needs at least 2")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()[:n]
    pre = Compose(card_preprocessing(card, with_label=True))
    data = [pre({k: v for k, v in items[i].items() if k in ("image", "label", "acquisition")}) for i in order]
    return torch.stack([torch.as_tensor(d["image"]).float() for d in data]), torch.tensor([int(d["label"]) for d in data])


def _ask(site: QuerySite, x: torch.Tensor, step: int):
    return site.answer(QueryRequest(x, step, {}, want_input_grad=False, update_discriminator=False))


def membership_inference(site_dir, datalist, policy=None, members_key: str = "training", nonmembers_key: str = "validation",
                         max_items: int = 500, batch_size: int = 64, seed: int = 0, device: str = "cpu") -> dict:
    """Attack AUROC of loss- and gradient-based membership inference on the site's answers under ``policy``
    (``None``: the site's own policy)."""
    from sklearn.metrics import roc_auc_score

    site = _audit_site(site_dir, policy, device)
    n_cls = site.card["classes"]["num_classes"]
    members = _load(site, datalist, members_key, max_items, seed)
    nonmembers = _load(site, datalist, nonmembers_key, max_items, seed + 1)
    n = min(len(members[0]), len(nonmembers[0]))
    x = torch.cat([members[0][:n], nonmembers[0][:n]])
    y = torch.cat([members[1][:n], nonmembers[1][:n]])
    is_member = np.r_[np.ones(n), np.zeros(n)]
    loss_scores, grad_scores = [], []
    for step, start in enumerate(range(0, len(x), batch_size)):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        ans = _ask(site, xb, step)
        released = ans.outputs.float().requires_grad_(ans.kind != "labels")
        loss = F.cross_entropy(released_log_probabilities(released, ans.kind, n_cls), yb, reduction="none")
        loss_scores.append(-loss.detach())
        if site.policy.return_gradients:
            (cot,) = torch.autograd.grad(loss.sum(), released)
            grad_scores.append(-site.vjp(cot).flatten(1).norm(dim=1))
    scores = {"loss": torch.cat(loss_scores).numpy()}
    if grad_scores:
        scores["gradient_norm"] = torch.cat(grad_scores).numpy()
    auroc = {k: float(roc_auc_score(is_member, v)) if np.ptp(v) > 0 else 0.5 for k, v in scores.items()}
    return {"attack_auroc": auroc, "best_attack_auroc": max(auroc.values()), "members": n, "nonmembers": n,
            "policy": site.policy.as_dict(), "privacy": site.privacy_report()}


def _ssim_to_nearest(images: torch.Tensor, references: torch.Tensor, spatial_dims: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each image: SSIM and PSNR to the reference image it is most similar to (by SSIM), and that index."""
    from monai.metrics import PSNRMetric, SSIMMetric

    ssim = SSIMMetric(spatial_dims=spatial_dims, data_range=1.0, win_size=7)
    psnr = PSNRMetric(max_val=1.0)
    best, best_psnr, idx = [], [], []
    for img in images:
        batch = img[None].expand(len(references), *img.shape)
        s = ssim(batch, references).flatten()
        j = int(s.argmax())
        best.append(float(s[j]))
        best_psnr.append(float(psnr(img[None], references[j:j + 1]).flatten()[0]))
        idx.append(j)
    return np.array(best), np.array(best_psnr), np.array(idx)


def input_inversion(site_dir, datalist, policy=None, target_class: int | None = None, n_images: int = 8, steps: int = 200,
                    lr: float = 0.1, zeroth_order_directions: int = 8, members_key: str = "training", nonmembers_key: str = "validation",
                    max_references: int = 1000, seed: int = 0, device: str = "cpu") -> tuple[dict, dict]:
    """Invert ``n_images`` inputs of ``target_class`` (default: the site's largest class) from query access; returns
    ``(report, images)`` where images holds the inverted inputs and their nearest training images."""
    site = _audit_site(site_dir, policy, device)
    card = site.card
    n_cls, sd = card["classes"]["num_classes"], card["spatial_dims"]
    counts = card.get("class_counts") or [1] * n_cls
    target = int(np.argmax(counts)) if target_class is None else int(target_class)
    shape = (n_images, card["input"]["channels"], *card["input"]["spatial_size"])
    g = torch.Generator().manual_seed(seed)
    w = (0.5 * torch.randn(shape, generator=g)).requires_grad_(True)  # x = sigmoid(w): always inside [0, 1]
    opt = torch.optim.Adam([w], lr=lr)
    labels = torch.full((n_images,), target)
    uses_vjp = site.policy.return_gradients

    def objective(released, kind):
        return F.cross_entropy(released_log_probabilities(released, kind, n_cls), labels, reduction="sum")

    for step in range(steps):
        x = torch.sigmoid(w).detach()
        ans = _ask(site, x, step)
        released = ans.outputs.float().requires_grad_(ans.kind != "labels")
        value = objective(released, ans.kind)
        if uses_vjp:
            (cot,) = torch.autograd.grad(value, released)
            grad_x = site.vjp(cot)
        else:  # zeroth order: finite differences of the released answers along random directions
            grad_x = torch.zeros_like(x)
            mu = 0.05
            for k in range(zeroth_order_directions):
                u = torch.randn(shape, generator=g)
                probe = _ask(site, (x + mu * u).clamp(0, 1), steps + step * zeroth_order_directions + k)
                with torch.no_grad():
                    diff = objective(probe.outputs.float(), probe.kind) - value.detach()
                grad_x += diff / (mu * zeroth_order_directions) * u
        opt.zero_grad(set_to_none=True)
        torch.sigmoid(w).backward(grad_x)
        opt.step()
    inverted = torch.sigmoid(w).detach()
    with torch.no_grad():
        final = _ask(site, inverted, 10 * steps * (zeroth_order_directions + 1))
        reached = float((released_log_probabilities(final.outputs.float(), final.kind, n_cls).argmax(1) == target).float().mean())
    train_x, _ = _load(site, datalist, members_key, max_references, seed)
    held_x, _ = _load(site, datalist, nonmembers_key, n_images, seed + 1)
    noise = torch.rand(shape, generator=g)
    s_inv, p_inv, idx = _ssim_to_nearest(inverted, train_x, sd)
    s_held, p_held, _ = _ssim_to_nearest(held_x, train_x, sd)
    s_noise, p_noise, _ = _ssim_to_nearest(noise, train_x, sd)
    report = {
        "target_class": card["classes"]["names"][target], "images": n_images, "steps": steps,
        "uses": "vector-Jacobian products" if uses_vjp else f"zeroth-order estimates ({zeroth_order_directions} extra queries per step)",
        "site_answers_target_class": reached,
        "ssim_to_nearest_training_image": {"inverted": float(s_inv.mean()), "held_out_real": float(s_held.mean()), "noise": float(s_noise.mean())},
        "psnr_to_nearest_training_image": {"inverted": float(p_inv.mean()), "held_out_real": float(p_held.mean()), "noise": float(p_noise.mean())},
        "references": len(train_x), "policy": site.policy.as_dict(), "privacy": site.privacy_report(),
    }
    return report, {"inverted": inverted, "nearest_training": train_x[torch.as_tensor(idx)]}


def run_audit(site_dir, datalist, output_dir, policy=None, max_items: int = 500, inversion_steps: int = 200, seed: int = 0,
              members_key: str = "training", nonmembers_key: str = "validation") -> dict:
    """Both attacks; writes ``audit.json`` and ``inversion.png`` (row 1: inverted inputs, row 2: nearest training
    images) to ``output_dir``."""
    from monai_fedkd.site.card import atomic_write_json
    from monai_fedkd.visualize import montage_2d, save_png

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    mia = membership_inference(site_dir, datalist, policy, members_key, nonmembers_key, max_items=max_items, seed=seed)
    inv, images = input_inversion(site_dir, datalist, policy, steps=inversion_steps, members_key=members_key,
                                  nonmembers_key=nonmembers_key, seed=seed)
    both = torch.cat([images["inverted"], images["nearest_training"]])
    if both.ndim == 5:  # 3D: the middle slice
        both = both[..., both.shape[-1] // 2]
    save_png(montage_2d(both, nrow=len(images["inverted"]), scale=4), out / "inversion.png")
    report = {"site": str(Path(site_dir).resolve()), "datalist": str(Path(datalist).resolve()), "seed": seed,
              "membership_inference": mia, "input_inversion": inv}
    atomic_write_json(out / "audit.json", report)
    logger.info("audit written to %s", out)
    return report


def policy_argument(value: str | None) -> dict | None:
    """A policy given on the command line: a JSON object or the path of a JSON file."""
    if value is None:
        return None
    path = Path(value)
    text = path.read_text() if path.is_file() else value
    try:
        policy = json.loads(text)
    except json.JSONDecodeError as e:
        raise AuditError(f"policy {value!r} is neither a JSON object nor a JSON file: {e}") from None
    if not isinstance(policy, dict):
        raise AuditError(f"policy must be a JSON object, got {type(policy).__name__}")
    return policy

