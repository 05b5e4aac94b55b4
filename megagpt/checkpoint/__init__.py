"""Checkpoints: atomic sharded saves, exact resume, loading into another layout, offline rewriting.

    format.py      the on-disk format: pieces of tensors that name the part of the global tensor they hold, rank
                   files, and CheckpointMetadata (metadata.json, defined, read and written in one place)
    reader.py      SavedCheckpoint: a checkpoint folder read lazily and verified (size, sha256); the full tensors
                   of a parameter in any layout; weight(): the fp32 main weight if saved, else the model weight
    paths.py       a checkpoint.dir's layout: latest, step_N, temporaries; "a folder or its latest"
                   (open_checkpoint), and which checkpoint checkpoint.load means (resolve_load)
    rank_state.py  what one rank writes (its pieces of weights and optimizer state) and its random states
    save.py        a training run's save: every rank writes its file, rank 0 publishes
    async_save.py  checkpoint.async_save: state copied to host buffers, written by a background thread, published
                   once the ranks agree (at step boundaries) that every writer has finished
    publish.py     atomic publish (metadata last, rename, `latest`), keep-K pruning, the background pruner
    offline.py     one process writing a whole checkpoint (resharding, conversion from Hugging Face)
    load.py        resuming: weights, optimizer, data position, loss scaler, random states
    reshard.py     rewriting a checkpoint for another layout, offline

When a run saves and when it stops (SIGTERM, SIGUSR1, checkpoint.exit_after_minutes) is train/run_control.py.
Every component saves and restores itself through state_dict() / load_state_dict(): the optimizer (Adam's
moments and the fp32 main weights, by piece), the tensor-parallel RNG, the loss scaler, the training position.
"""
