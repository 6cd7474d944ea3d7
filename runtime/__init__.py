"""The runtime: a compiled `Plan` applied to a PyTorch model. It never imports lark.

The subpackages are the pipeline, in order:

    io/          read and write what the user hands in and gets back: checkpoints, MASE TOML, atomic writes,
                 user factories (`FILE.py:factory`)
    models/      built-in models and datasets, training, evaluation
    calibrate/   prepare (resolve profile points against the model) -> hooks -> statistics (`stats/`,
                 quantiles, sketch) -> a `StatsTable`
    quantize/    resolve the plan's bindings per module -> map statistics to parameters -> quantiser
                 configs -> convert the model (modules, `ternary.ckpt`)
    run/         the orchestration of a whole command (`pipeline`), across processes (`collectives`,
                 `workers`)

`errors.UserError` is every failure caused by user input; `progress` draws the progress bars.
"""
