"""mmedge.exporters: checkpoint -> family split -> per-part graphs -> package. Needs torch."""
