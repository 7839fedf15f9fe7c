"""The batch hand-off: how a batch gets from where it is read to the training step, in one process or from
DataLoader workers, without a per-batch allocation or copy.

- assemble.py: ``Assembler`` -- the dataset's read of a batch (in parts on ``loader.decode_threads``
  threads) and its per-sample transforms, into given arrays, in whichever process reads the batch;
- slots.py: ``SlotRings`` -- per worker, a ring of batch-sized slots in shared memory allocated once (and
  page-locked once on CUDA); a batch crosses to the main process as a token, and its tensors view the slot
  until they are garbage;
- workers.py: ``WorkerBatches`` -- the dataset a DataLoader's workers see: assemble each batch into a slot
  of the worker's ring and return its token (or, when the ring is full, the batch itself).

pipeline/training/loading.py builds loaders on these; docs/parallel-loading.md has the design's figures.
"""
