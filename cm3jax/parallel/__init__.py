"""Device mesh, distributed start-up and logical-axis sharding."""
