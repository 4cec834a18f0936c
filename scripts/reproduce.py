"""Reproduce the reported table: the same as the ``towerrec-reproduce`` console command.

    python scripts/reproduce.py preset=hm
    python scripts/reproduce.py seeds=[0] baselines=[popularity] 'train_overrides=["trainer.max_epochs=3"]'

See :mod:`towerrec.commands.reproduce` and ``configs/reproduce.yaml``.
"""

from towerrec.commands.reproduce import main

if __name__ == "__main__":
    main()
