"""Labeling: the nightly batch job on Ray Data (config, resources, CPU stages, inference, the output tables,
commit protocol, writer, previews, the job). Import from the modules; this package face must stay torch-free
because the CPU stages (`stages`, `canvas`, `tables`, `codec`) run in fresh Ray workers that must not load torch."""
