"""Quality lab II: glyphs rendered from Debian's fonts (`data`), a 1024-token pixel-space SiT, an SD-style
UNet and a glyph classifier (`models`), trained resumably here (`train`; docs/lab.md, "Lab II").

    python -m diffusers_ext.lab train dit --out lab_runs/dit --minutes 600 --resume
"""
