"""The benchmark: the app against simulators with a fixed cost model, compared with the bound
that model allows and with a naive one-request-at-a-time baseline.

`python -m bench.run` (or `make bench`) runs everything and writes `bench/results/`; see
`bench/README.md` for the cost model, how the bound is computed and how the baseline is scaled."""
