"""Reading, checking and converting every kind of weight file the project uses: safe file I/O
(`io`), motion modules, LoRAs and adapters, base and single-file models, textual inversions,
`detect`ion of what a file is, exports, and weights by name from the Hugging Face Hub (`hub`,
torch-free, so the command line can resolve names before loading anything).
"""
