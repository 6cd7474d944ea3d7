"""What quantisation did, for a person to look at: `ternqc report DIR`, `apply --report` and `sweep.html`.

The subpackage reads as the flow: `histograms` (compact histograms of the calibrated values, gathered while
`apply` runs) → `details` (what report.json holds beyond accuracies: the run, histograms, quantisation
errors, the rule behind each parameter, notes) → `plots` (matplotlib figures as SVG data URIs) → `page`
(the self-contained report.html) and `sweep_page` (sweep.html) → `write` (read report.json, write the page).
Only `plots` needs matplotlib (the optional `report` extra); it is imported when a page is drawn.
"""
