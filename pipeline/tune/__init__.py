"""``pipeline-tune``: the machine measures itself and picks the loader settings, and says why.

    pipeline-tune storage=encoded transform=flip_crop source=image_folder source.root=/data/photos
    # ... facts, trials, the answer; the last line printed:
    pipeline storage=encoded transform=flip_crop source=image_folder source.root=/data/photos \
        loader.decode_threads=2

    pipeline ... loader.num_workers=auto loader.decode_threads=auto   # the last tune's answer, else a rule

The rooms (docs/tuning.md tells the whole story, with figures):

- schema.py  the ``tune`` node on top of the job's own config (conf/tune.yaml), and its checks
- facts.py   the machine and the data: cores, CPU quota, memory, the export's size against the page cache,
             the disk, the serial loader's and the training step's time a batch
- space.py   the candidates (format, buffers, workers, decode threads, prefetch) and the rules that prune
             them, each a named function with its reason
- trials.py  short measured trials of the real training step (the job's stages, ``train_pass``)
- tuner.py   the budget, the order of the trials, and the check of the best against the default
- report.py  the answer: sentences naming the bottleneck each choice addresses, tables, the config file,
             the MLflow parent run with a child run per trial
- record.py  the last tune per machine, export and job shape, which ``auto`` reads (auto.py)
- cli.py     the command

What is learned never changes: data, model, batch size and seed are the user's, and the settings tried only
decide how the same batches are made.
"""
