"""The review loop (docs/review.md): the least confident labels out to annotators as pre-annotations (CVAT,
Label Studio, COCO), and their corrections back as a dataset that training reads."""
