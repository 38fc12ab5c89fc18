"""The shapes recipe: scenes of 1-3 coloured shapes whose ground truth makes every evaluation exact.

    cm3jax pipeline --config=configs/shapes.py --workdir=workdir/shapes

The embedded shapes scenes, rendered at 24x24: the VQ-GAN (f=4) turns them into 6x6 = 36 codes from a 512-code
codebook, so a whole scene is 36 image tokens to draw and every code covers a quarter of one grid cell (8x8 pixels).
evaluation/shapes_parser.py reads every 24x24 render exactly (docs/evaluation.md: the parser's ceiling on
reconstructions). The earlier 48x48 renders took 144 codes a scene and 576-token sequences: four times the LM's work
for the same scenes. Every choice below is made for what learns most per minute of a 2-core CPU (docs/sft.md).
"""
from configs import demo


def get_config(arg=None):
    demo.check_recipe_arg("shapes", arg)
    c = demo.get_config()
    c.vocab.text_size = 512  # captions use a few dozen words
    c.raw_data.update(dataset="shapes", image_size=24, shapes_image_size=24, shapes_train_size=10000)
    # The per-patch encoder gives each 4x4-pixel patch content exactly one code (the conv encoder spread the
    # background alone over ~300 codes, 4 nats a code the LM had to learn; benchmarks/code_entropy.py, docs/sft.md).
    # The per-patch decoder draws each code's patch alone (the cells are aligned to the patches): a step takes a fifth
    # of the conv decoder's, and 1,000 steps give every held-out scene back exactly (the conv decoder needed 2,000
    # steps, 23 minutes of the hour; docs/sft.md). Its MLP and the encoder's are 256 wide with 2 blocks: 64 wide with
    # one, the decoder stalled near 21 dB.
    c.vqgan.update(image_size=24, lpips_weight=0.0, encoder="patch", decoder="patch", channels=128, num_res_blocks=2)
    c.vqgan.optim.peak_lr = 1e-3
    c.vqgan.train.update(steps=1000, eval_every=250, checkpoint_every=250)
    c.tokenize.shard_size = 2000
    c.retriever.text_len = 40
    # The near-copy filter at 0.9 leaves a neighbour to about 0.2% of train scenes, so the LM trains in effect without
    # retrieved scenes, which at this budget draws better than 0-2 of them (docs/evaluation.md: the retrieval table).
    # How many scenes keep one moves with the spread of the retriever's embeddings; state it with
    # --config.data.retrieval=none or a higher duplicate_threshold (0.99: 95%).
    c.retrieval.update(chunk_size=2000, duplicate_threshold=0.9)
    # Up to 2 retrieved scenes of ~30 caption pieces and 36 codes each before the query document; the longest SFT
    # prompt (grounded: caption and three boxes) with its image takes ~140.
    c.model.max_seq_len = 256
    # Each code's cell in the 6x6 grid is given, not inferred from its distance to <break> (which varies with the
    # caption's length): drawing, copying a source image (edit) and following a map (structure) all place codes by
    # cell.
    c.model.image_grid_embedding = True
    c.export.format = "params"  # transformers' OPT has no image-grid embedding (docs/export.md)
    # Half the demo's width: the held-out losses per step match the 256-wide LM's (0.364 / 0.551 image / text at
    # step 600 against 0.359 / 0.518) at 2.5x the steps per minute, so the hour buys twice the steps.
    c.model.d_model = 128
    c.optim.peak_lr = 3e-3
    c.train.seq_len = 256
    c.train.update(steps=1200, eval_every=200, checkpoint_every=300, keep_checkpoints=8)  # every SFT checkpoint kept
    # for scoring afterwards (`cm3jax eval --config.eval.step=N`)
    # Instruction tuning (docs/sft.md) on every task the scenes allow. The pretrained LM is far from converged at this
    # budget, so SFT re-warms to a pretraining-sized rate rather than the paper's 5e-5 for a converged 7B model. The
    # loss on the target alone without CM3 spans scores better on every task at this budget than CM3leon's
    # loss_on=all with CM3 (docs/sft.md). Without CM3 spans the guidance streams' masked prompts are trained by
    # condition dropout.
    # Captioning and VQA examples are all text-first, the form eval prompts with (docs/sft.md: 96.5% of captions exact
    # against 90.6% with half of them image-first), and VQA has three times the other tasks' weight: its answers are a
    # token or two, and drawing, grounding and structure still reach 100% with a third of its share (VQA 86.6%
    # against 80.1% at weight 1; edit 82.4%).
    c.sft.update(steps=2400, peak_lr=2e-3, warmup_steps=20, loss_on="target", cm3=False, condition_dropout=0.15,
                 image_first_probability=0.0)
    c.sft.mixture.vqa = 3.0
    c.eval.tasks = ("reconstruction", "loss", "text_to_image", "caption", "vqa", "edit", "structure", "grounded")
    c.eval.guidance = ("cfg",)  # CM3leon's setting (--config.eval.guidance="('none', 'cfg')" adds unguided)
    c.eval.update(num_examples=256, batch_size=32)  # 64 scenes leave +-6 points of noise
    # Editing guidance chosen by benchmarks/guidance_sweep.py on 64 validation scenes that eval does not score
    # (docs/sft.md): text scale 1.5 over the default 7.5; structure keeps CFG 1.5.
    c.generate.update(image_scale=1.5, text_scale=1.5)
    c.generate.update(sample_prompts=("a large red circle in the center",
                                      "a small blue square in the top left and a large yellow triangle at the bottom"))
    if arg == "smoke":
        c.raw_data.shapes_train_size = 512
        c.tokenize.shard_size = 256
        demo.shrink_to_smoke(c)
    return c
