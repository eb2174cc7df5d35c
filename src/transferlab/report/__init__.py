"""Everything a person reads about a run: the run folder's files and how numbers are shown.

`writer.write` lays out a study's run folder (`layout`: report.html, report.md, metrics.json, config.yaml
and README.txt at the top; methods/<name>/, models/<name>/, plots/) from the results the other stages
computed; `markdown` and `sections` render report.md, `html` renders report.html from the files written,
`plots` draws the PNGs, `format` holds the number and table formatters all of them share, and `compare`
puts several runs side by side. Nothing here fits or scores a model: evaluation/ computes, report/ shows.
"""
