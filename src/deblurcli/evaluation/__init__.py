"""``deblurcli eval``: the paper's metrics (pyiqa) on GoPro / RealBlur / folders, γ sweeps.

* :mod:`.metrics`  -- pyiqa metric wrappers and the offline weight-file check;
* :mod:`.datasets` -- GoPro / RealBlur lists / folder pairing and ``--pred`` matching;
* :mod:`.align`    -- translation alignment used by ``--align`` (RealBlur protocol, simplified);
* :mod:`.runner`   -- scoring the input, existing outputs or the model over γ values;
* :mod:`.report`   -- Rich table, per-image CSV, summary JSON, γ-sweep plot.
"""
