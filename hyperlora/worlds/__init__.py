"""Where weights come from: the real SDXL stack (`sdxl`) or the miniature the project trains (`toy`)."""
