"""The shapes recipe: scenes of 1-3 coloured shapes whose ground truth makes every evaluation exact.

    cm3jax pipeline --config=configs/shapes.py --workdir=workdir/shapes

The demo's CPU-sized models and stages (configs/demo.py) on the embedded shapes scenes, rendered at 48x48 (the size
the models see, so no resize blurs them): the VQ-GAN turns them into 12x12 = 144 codes (f=4) from a 512-code codebook,
which evaluation/shapes_parser.py reads back (docs/evaluation.md: the parser's ceiling on its reconstructions). At
32x32 the corners of small shapes did not survive tokenization.
"""
from configs import demo


def get_config(arg=None):
    demo.check_recipe_arg("shapes", arg)
    c = demo.get_config()
    c.vocab.text_size = 512  # captions use a few dozen words
    c.raw_data.update(dataset="shapes", image_size=48, shapes_image_size=48, shapes_train_size=10000)
    c.vqgan.image_size = 48
    # 400 steps: the held-out scenes parse exactly from their reconstructions (docs/evaluation.md: the ceiling).
    c.vqgan.train.update(steps=400, eval_every=200, checkpoint_every=200)
    c.tokenize.shard_size = 2000
    c.retriever.text_len = 40
    c.retrieval.update(chunk_size=2000, duplicate_threshold=0.9)
    # Up to 2 retrieved scenes of ~30 caption pieces and 144 codes each before the query document.
    c.model.max_seq_len = 576
    c.train.seq_len = 576
    c.train.update(steps=400, eval_every=200, checkpoint_every=200)  # ~2 s a step on 2 cores
    # Instruction tuning (docs/sft.md) on every task the scenes allow. The pretrained LM is far from converged at this
    # budget, so SFT re-warms to a pretraining-sized rate rather than the paper's 5e-5 for a converged 7B model. The
    # loss on the target alone without CM3 spans scores better on every task at this budget than CM3leon's
    # loss_on=all with CM3 (docs/sft.md: VQA 61.9% against 19.7% after 400 steps).
    c.sft.update(steps=400, peak_lr=1e-3, warmup_steps=20, loss_on="target", cm3=False)
    c.eval.tasks = ("reconstruction", "loss", "text_to_image", "caption", "vqa", "edit", "structure", "grounded")
    c.eval.guidance = ("cfg",)  # CM3leon's setting; unguided text -> image costs ~45 s a model (--config.eval.guidance)
    c.generate.update(sample_prompts=("a large red circle in the center",
                                      "a small blue square in the top left and a large yellow triangle at the bottom"))
    if arg == "smoke":
        c.raw_data.update(shapes_train_size=512, image_size=32, shapes_image_size=32)
        c.vqgan.image_size = 32
        c.tokenize.shard_size = 256
        demo.shrink_to_smoke(c)
    return c
