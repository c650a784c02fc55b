"""Training: data-parallel FCN training on Ray Train (config, driver, worker loop, run state, inputs,
transforms, metrics, evaluation). Import from the modules; this package face stays empty so that Ray Data's
CPU tasks importing `pipeline.train.inputs` never load torch."""
