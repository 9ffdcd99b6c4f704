"""How cleanly a model's binary codes separate the classes: the accuracy of its classifier F8 applied to
the codes (H > 0.5) stored in encoded collections, against their labels.

The database of the results' protocol is the training split, so its codes are only as clean as the
network's fit to it; this is the number behind "What moved mAP" in docs/results.md.

    python docs/f8-on-codes.py fmft48c.pt fmft48c-test fmft48c-train
"""
import sys

import numpy as np

from hashsearch.codes import unpack_codes
from hashsearch.encoders.checkpoint import load_model
from hashsearch.shards.collection import Collection

model, _ = load_model(sys.argv[1])
weight = model.classifier.weight.detach().float().numpy()
bias = model.classifier.bias.detach().float().numpy()
for root in sys.argv[2:]:
    with Collection.open(root) as coll:
        codes = unpack_codes(coll.codes(), coll.bits).astype(np.float32)
        predicted = (codes @ weight.T + bias).argmax(1)
        print(f"{root}: {np.mean(predicted == coll.labels()):.4f} over {len(predicted)} items")
