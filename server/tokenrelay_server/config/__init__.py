"""Configuration: typed server settings (defaults < file < environment <
flags) and the [providers.*] / [models.*] tables, with errors naming the key."""
