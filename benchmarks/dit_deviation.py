"""Distance of the training-free / initial attention of each method from stock attention, per
layer output of one DiT-XL/2 attention module (random weights, hidden states ~ LayerNorm'd noise).

    python benchmarks/dit_deviation.py
    python benchmarks/dit_deviation.py --quick     # smoke test: 256^2 only

Relative error ||O - O_stock|| / ||O_stock|| of the attention module's output (after to_out), and
cosine similarity. Random weights give near-uniform attention maps, where pooled mediators do well;
trained models have sharper maps: treat these numbers as a check of the init, not of quality.
Writes benchmarks/results/dit_deviation.md.
"""

import argparse

import torch

import diffusers_ext as dx
import harness


def main(argv=None):
    from diffusers import DiTTransformer2DModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_output_argument(parser, harness.RESULTS / "dit_deviation.md")
    harness.add_quick_argument(parser, "256^2 only")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    lines = harness.header("Initial deviation from stock attention (DiT-XL/2 attention module, random weights)",
                           __file__, argv=argv, device="cpu", dtype=torch.float32)
    rows = []
    for resolution in (256,) if args.quick else (256, 512):
        model = DiTTransformer2DModel(num_layers=1, sample_size=resolution // 8, num_embeds_ada_norm=1000,
                                      out_channels=8).eval()
        attn = model.transformer_blocks[0].attn1
        side = resolution // 16
        x = torch.nn.functional.layer_norm(torch.randn(2, side * side, 1152), (1152,))
        with torch.no_grad():
            stock = attn(x)
        for name, method, options in (("mediators n=16", "mediator", dict(mediators=16)),
                                      ("mediators n=64", "mediator", dict(mediators=64)),
                                      ("mediators n=256", "mediator", dict(mediators=256)),
                                      ("VCA n=64 (init, calibrated gain)", "vca", dict(tokens=64)),
                                      ("VCA n=64 (init, calibrate=False)", "vca", dict(tokens=64, calibrate=False))):
            if options.get("mediators", 0) * 4 > side * side:
                continue
            record = dx.patch(model, method, **options)
            record.state.latent_hw = (resolution // 8, resolution // 8)
            with torch.no_grad():
                out = attn(x)
            dx.unpatch(model)
            err = ((out - stock).norm() / stock.norm()).item()
            cos = torch.nn.functional.cosine_similarity(out.flatten(), stock.flatten(), dim=0).item()
            rows.append([f"{resolution}^2", name, f"{err:.3f}", f"{cos:.3f}"])
    lines += harness.markdown_table(["resolution", "variant", "relative error", "cosine"], rows)
    harness.write_atomic(harness.output_path(args, ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
