"""Storage only: checkpoint files (`checkpoint`), safetensors I/O (`safetensors_io`), atomic writes and
the file lock (`atomic`), behavior tables (`table`, `table_format`, `text_key`), the embedded-model
registry (`registry`, `packages`, `smollm2`). No nn.Module lives here, and nothing here imports
`kernels` or `engine`. Import names from their modules; this file imports nothing."""
