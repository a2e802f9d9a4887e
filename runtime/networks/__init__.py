"""Add-on networks applied to a bundle's graphs without re-exporting them: LoRA / LyCORIS files
and external VAEs, merged into the graphs' weights when their sessions are made (docs/NETWORKS.md)."""
